/**
 * Format probing: which format an image's first bytes name. The formats vdisk
 * opens declare their magic in the driver registry (drivers/registry.ts); the
 * ones here are formats it does not open but must still recognise, so that a
 * probe never takes such an image for raw and the guard on a probed raw image
 * (probed-raw.ts) never lets a write turn the image into one.
 */

/** Bytes of an image the probe looks at: the first sector, as QEMU's raw driver guards. */
export const PROBE_BYTES = 512;

export interface Magic {
  format: string;
  magic: Buffer;
}

export const FOREIGN_MAGICS: readonly Magic[] = [
  { format: 'qed', magic: Buffer.from('QED\0', 'latin1') },
  { format: 'vmdk', magic: Buffer.from('KDMV', 'latin1') },
  // VMware 3 sparse (QEMU's vmdk driver reads it too).
  { format: 'vmdk', magic: Buffer.from('COWD', 'latin1') },
  { format: 'vdi', magic: Buffer.from('<<< ', 'latin1') },
];

/** The format whose magic starts `head` (up to PROBE_BYTES of it), or a text VMDK descriptor; 'raw' when none matches. */
export function matchMagic(head: Buffer, magics: readonly Magic[]): string {
  const magic = magics.find((m) => head.subarray(0, m.magic.length).equals(m.magic))?.format;
  if (magic) return magic;
  return isVmdkDescriptor(head) ? 'vmdk' : 'raw';
}

/**
 * A text VMDK descriptor, as QEMU's vmdk_probe() recognises one: after comment
 * lines and blank lines, a line "version=1", "version=2" or "version=3". It
 * names its extents by host path ('RW 2048 FLAT "/root/secret" 0'), so a guest
 * that wrote one into sector 0 of a probed raw image would hand the next QEMU
 * that probes the image (qemu-img included) any file it likes: the guard
 * (probed-raw.ts) must refuse it as QEMU's raw driver does.
 */
function isVmdkDescriptor(head: Buffer): boolean {
  const text = head.toString('latin1');
  let p = 0;
  while (p < text.length) {
    if (text[p] === '#') {
      const nl = text.indexOf('\n', p);
      if (nl < 0) return false;
      p = nl + 1;
      continue;
    }
    if (text[p] === ' ') {
      while (p < text.length && text[p] === ' ') p++;
      if (text[p] === '\r') p++;
      // Only blank lines may come before the version line.
      if (text[p] !== '\n') return false;
      p++;
      continue;
    }
    return /^version=[123]\r?\n/.test(text.slice(p, p + 11));
  }
  return false;
}
