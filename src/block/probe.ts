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
  { format: 'vdi', magic: Buffer.from('<<< ', 'latin1') },
];

/** The format whose magic starts `head` (up to PROBE_BYTES of it); 'raw' when none matches. */
export function matchMagic(head: Buffer, magics: readonly Magic[]): string {
  return magics.find((m) => head.subarray(0, m.magic.length).equals(m.magic))?.format ?? 'raw';
}
