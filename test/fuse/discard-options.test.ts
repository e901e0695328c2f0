/** --discard and --detect-zeroes through a real mount: what reaches the image file. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { MiB, Mount, sh } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({}, (d) => (dir = d));

function filledImage(name: string): string {
  const image = path.join(dir, name);
  expect(sh(`head -c ${16 * MiB} /dev/urandom > ${image} && sync ${image}`).status).toBe(0);
  return image;
}

function readRange(file: string, offset: number, bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, b, 0, bytes, offset);
  fs.closeSync(fd);
  return b;
}

describe('discard and detect-zeroes options', () => {
  it('--discard unmap: punch-hole frees space in the image', async () => {
    const image = filledImage('unmap.img');
    const m = await Mount.start(image, `${image}.mnt`, ['--discard', 'unmap']);
    const before = fs.statSync(image).blocks;
    expect(sh(`fallocate -p -o ${4 * MiB} -l ${8 * MiB} ${image}.mnt`).status).toBe(0);
    expect(await m.stop()).toBe(0);
    expect(readRange(image, 4 * MiB, 8 * MiB).every((b) => b === 0)).toBe(true);
    expect(fs.statSync(image).blocks).toBeLessThanOrEqual(before - (8 * MiB) / 512);
  });

  it('--discard ignore: punch-hole still reads zero, but the image keeps its space', async () => {
    const image = filledImage('ignore.img');
    const m = await Mount.start(image, `${image}.mnt`, ['--discard', 'ignore']);
    const before = fs.statSync(image).blocks;
    expect(sh(`fallocate -p -o ${4 * MiB} -l ${8 * MiB} ${image}.mnt`).status).toBe(0);
    expect(readRange(`${image}.mnt`, 4 * MiB, 8 * MiB).every((b) => b === 0)).toBe(true);
    expect(await m.stop()).toBe(0);
    expect(readRange(image, 4 * MiB, 8 * MiB).every((b) => b === 0)).toBe(true);
    expect(fs.statSync(image).blocks).toBeGreaterThanOrEqual(before);
  });

  it('--detect-zeroes unmap: writing zeroes frees space; off: it writes them as data', async () => {
    for (const mode of ['unmap', 'off'] as const) {
      const image = filledImage(`detect-${mode}.img`);
      const m = await Mount.start(image, `${image}.mnt`, ['--detect-zeroes', mode]);
      expect(sh(`dd if=/dev/zero of=${image}.mnt bs=1M count=8 seek=4 conv=notrunc,fsync status=none`).status).toBe(0);
      expect(await m.stop()).toBe(0);
      expect(readRange(image, 4 * MiB, 8 * MiB).every((b) => b === 0)).toBe(true);
      const blocks = fs.statSync(image).blocks;
      if (mode === 'unmap') expect(blocks).toBeLessThanOrEqual((8 * MiB) / 512 + 64);
      else expect(blocks).toBeGreaterThanOrEqual((16 * MiB) / 512);
    }
  });
});
