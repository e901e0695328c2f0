/** Opening an image by file name: format probing (top image only) and the node graph. */
import fs from 'node:fs/promises';
import { BlockNode, type DetectZeroes, type DiscardMode } from './node.js';
import { FileDriver } from '../drivers/file.js';
import { VdiskError } from '../errors.js';

export type ImageFormat = 'raw';

export interface OpenOptions {
  /** Format of the image; probed from its first bytes when absent. */
  format?: string;
  readOnly?: boolean;
  detectZeroes?: DetectZeroes;
  discard?: DiscardMode;
}

const MAGICS: Array<{ format: string; magic: Buffer }> = [
  { format: 'qcow2', magic: Buffer.from([0x51, 0x46, 0x49, 0xfb]) },
  { format: 'qed', magic: Buffer.from('QED\0', 'latin1') },
  { format: 'vmdk', magic: Buffer.from('KDMV', 'latin1') },
  { format: 'vdi', magic: Buffer.from('<<< ', 'latin1') },
];

/** The format named by the image's magic bytes; 'raw' when none matches. */
export async function probeFormat(path: string): Promise<string> {
  let head: Buffer;
  try {
    const fh = await fs.open(path, 'r');
    try {
      head = Buffer.alloc(8);
      await fh.read(head, 0, 8, 0);
    } finally {
      await fh.close();
    }
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${path}`);
    throw err;
  }
  return MAGICS.find((m) => head.subarray(0, m.magic.length).equals(m.magic))?.format ?? 'raw';
}

/** Open an image file as the top node of a chain. */
export async function openImage(path: string, options: OpenOptions = {}): Promise<BlockNode> {
  const format = options.format ?? (await probeFormat(path));
  const nodeOptions = { name: path, detectZeroes: options.detectZeroes ?? 'off', discard: options.discard ?? 'unmap' } as const;
  switch (format) {
    case 'raw':
      return new BlockNode(await FileDriver.open(path, { readOnly: options.readOnly ?? false }), nodeOptions);
    default:
      throw new VdiskError('ERR_IMAGE_FORMAT', `${path}: format '${format}' is not supported yet (supported: raw)`);
  }
}
