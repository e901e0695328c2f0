/** Reading an image through vdisk's block layer, and asking qemu-img about it. */
import { expect } from 'vitest';
import * as io from '../../src/block/io.js';
import { openImage, type OpenOptions } from '../../src/block/open.js';
import { sh } from './vdisk.js';

/** The whole virtual disk, read through vdisk's block layer (read-only open). */
export async function readImage(image: string, options: OpenOptions = {}): Promise<Buffer> {
  const node = await openImage(image, { readOnly: true, ...options });
  try {
    const buf = Buffer.alloc(node.size());
    await io.preadv(node, 0, buf.length, [buf]);
    return buf;
  } finally {
    await node.close();
  }
}

export interface QemuCheck {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  /** What qemu-img printed, for failure messages. */
  output: string;
}

/** `qemu-img check --output=json`, with absent counts as 0. */
export function qemuImgCheck(image: string): QemuCheck {
  const r = sh(`qemu-img check --output=json ${image}`);
  const j = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, output: r.stdout + r.stderr };
}

/** qemu-img finds neither corruptions nor leaks in the image. */
export function expectQemuClean(image: string): void {
  const c = qemuImgCheck(image);
  expect({ corruptions: c.corruptions, leaks: c.leaks }, c.output).toEqual({ corruptions: 0, leaks: 0 });
}
