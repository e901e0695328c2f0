/**
 * Format probing: which format an image's first bytes name. Used to pick the
 * format of an image given without -f, and by the guard on a probed raw image
 * (probed-raw.ts), which must never let a write make the image probe as
 * something else.
 */

/** Bytes of an image the probe looks at: the first sector, as QEMU's raw driver guards. */
export const PROBE_BYTES = 512;

const MAGICS: Array<{ format: string; magic: Buffer }> = [
  { format: 'qcow2', magic: Buffer.from([0x51, 0x46, 0x49, 0xfb]) },
  { format: 'qed', magic: Buffer.from('QED\0', 'latin1') },
  { format: 'vmdk', magic: Buffer.from('KDMV', 'latin1') },
  { format: 'vdi', magic: Buffer.from('<<< ', 'latin1') },
];

/** The format named by an image's first bytes (up to PROBE_BYTES of them); 'raw' when none matches. */
export function probeHead(head: Buffer): string {
  return MAGICS.find((m) => head.subarray(0, m.magic.length).equals(m.magic))?.format ?? 'raw';
}
