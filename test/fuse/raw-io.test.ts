/** A raw image through a real mount, driven by dd, cp, fallocate, du and lseek. */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { MiB, Mount, randomFile, sh } from '../helpers/vdisk.js';
import { native, SEEK_DATA, SEEK_HOLE } from '../../src/native.js';

const SIZE = 64 * MiB;

let dir: string;
let image: string;
let mnt: string;
let mount: Mount;

function readImage(offset: number, bytes: number): Buffer {
  const fd = fs.openSync(image, 'r');
  try {
    const b = Buffer.alloc(bytes);
    fs.readSync(fd, b, 0, bytes, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function readMount(offset: number, bytes: number): Buffer {
  const fd = fs.openSync(mnt, 'r');
  try {
    const b = Buffer.alloc(bytes);
    const n = fs.readSync(fd, b, 0, bytes, offset);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

function allocatedBlocks(file: string): number {
  return fs.statSync(file).blocks;
}

async function seek(file: string, offset: number, whence: number): Promise<number | string> {
  const fd = fs.openSync(file, 'r');
  try {
    return await native().lseek(fd, offset, whence);
  } catch (err) {
    return (err as { code: string }).code;
  } finally {
    fs.closeSync(fd);
  }
}

useScratchDir({}, (d) => (dir = d));

beforeAll(async () => {
  image = path.join(dir, 'disk.img');
  mnt = path.join(dir, 'disk');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, SIZE);
  mount = await Mount.start(image, mnt);
});

afterAll(async () => {
  if (mount) expect(await mount.stop()).toBe(0);
});

describe('raw image through a FUSE mount', () => {
  it('looks like a file of the disk size with a real block size, mode 0600', () => {
    const st = fs.statSync(mnt);
    expect(st.isFile()).toBe(true);
    expect(st.size).toBe(SIZE);
    expect(st.blksize).toBeGreaterThanOrEqual(4096);
    expect(st.mode & 0o777).toBe(0o600);
  });

  it('dd round-trips at many offsets and sizes, including 1 and 511 bytes unaligned', () => {
    const src = path.join(dir, 'src.bin');
    const data = randomFile(src, 3 * MiB);
    const cases: Array<[number, number]> = [
      [0, 1], [1, 1], [511, 511], [4095, 1], [4097, 511], [65535, 4097], [MiB - 1, 2], [3 * MiB + 7, 1 * MiB + 13], [10 * MiB, 2 * MiB], [SIZE - 511, 511], [SIZE - 1, 1],
    ];
    for (const [offset, bytes] of cases) {
      const r = sh(`dd if=${src} of=${mnt} bs=${bytes} count=1 seek=${offset} conv=notrunc iflag=fullblock oflag=seek_bytes status=none && sync ${mnt}`);
      expect(r.status, r.stderr).toBe(0);
      const expected = data.subarray(0, bytes);
      expect(readImage(offset, bytes).equals(expected)).toBe(true);
      // Read back through dd as well, not only through our own fs calls.
      const out = sh(`dd if=${mnt} bs=64K iflag=skip_bytes,count_bytes skip=${offset} count=${bytes} status=none | cmp - <(head -c ${bytes} ${src})`);
      expect(out.status, out.stdout + out.stderr).toBe(0);
    }
  });

  it('reads past the end return nothing; writes past the end fail with ENOSPC; truncate is refused', () => {
    expect(readMount(SIZE - 10, 100).length).toBe(10);
    expect(readMount(SIZE, 100).length).toBe(0);
    const w = sh(`printf abc | dd of=${mnt} bs=1 seek=${SIZE} conv=notrunc status=none`);
    expect(w.status).not.toBe(0);
    expect(w.stderr).toMatch(/No space left on device/);
    const t = sh(`truncate -s 1M ${mnt}`);
    expect(t.status).not.toBe(0);
    expect(t.stderr).toMatch(/Invalid argument/);
    expect(fs.statSync(mnt).size).toBe(SIZE);
  });

  it('cp in overwrites in place (O_TRUNC ignored, as on a block device) and cp out copies the disk', () => {
    const src = path.join(dir, 'cp-in.bin');
    const data = randomFile(src, 5 * MiB + 123);
    const r = sh(`cp ${src} ${mnt}`);
    expect(r.status, r.stderr).toBe(0);
    expect(fs.statSync(mnt).size).toBe(SIZE);
    expect(readImage(0, data.length).equals(data)).toBe(true);
    const out = path.join(dir, 'cp-out.img');
    expect(sh(`cp ${mnt} ${out}`).status).toBe(0);
    expect(sh(`cmp ${out} ${image}`).status).toBe(0);
    fs.rmSync(out);
  });

  it('fallocate -z and -p leave the range reading zero; punch returns space (du shrinks)', () => {
    const src = path.join(dir, 'fill.bin');
    randomFile(src, 16 * MiB);
    expect(sh(`dd if=${src} of=${mnt} bs=1M seek=16 conv=notrunc,fsync status=none`).status).toBe(0);
    const blocksBefore = allocatedBlocks(mnt);
    expect(blocksBefore).toBe(allocatedBlocks(image));

    // Unaligned zero-range and punch.
    expect(sh(`fallocate -z -o ${16 * MiB + 1000} -l ${MiB + 3} ${mnt}`).status).toBe(0);
    expect(readMount(16 * MiB + 1000, MiB + 3).every((b) => b === 0)).toBe(true);
    expect(readMount(16 * MiB + 999, 1)[0]).toBe(fs.readFileSync(src)[999]);
    expect(sh(`fallocate -p -o ${20 * MiB + 5} -l ${4 * MiB} ${mnt}`).status).toBe(0);
    expect(readMount(20 * MiB + 5, 4 * MiB).every((b) => b === 0)).toBe(true);
    expect(readImage(20 * MiB + 5, 4 * MiB).every((b) => b === 0)).toBe(true);
    const blocksAfter = allocatedBlocks(mnt);
    expect(blocksAfter).toBeLessThan(blocksBefore - (3 * MiB) / 512);
    const du = sh(`du -k ${mnt}`);
    expect(Number(du.stdout.split('\t')[0])).toBe(Math.ceil((blocksAfter * 512) / 1024));
    // Unsupported modes answer EOPNOTSUPP; growing the disk is ENOSPC.
    expect(sh(`fallocate -c -o 0 -l 4096 ${mnt}`).stderr).toMatch(/Operation not supported/);
    expect(sh(`fallocate -o ${SIZE - 4096} -l 8192 ${mnt}`).stderr).toMatch(/No space left/);
    expect(sh(`fallocate -o 0 -l 4096 ${mnt}`).status).toBe(0);
  });

  it('SEEK_DATA/SEEK_HOLE follow the allocation, with ENXIO past the last data', async () => {
    // Make a known layout: zero everything, then data at [8M, 9M) and [40M, 40M+4K).
    expect(sh(`fallocate -p -o 0 -l ${SIZE} ${mnt}`).status).toBe(0);
    expect(sh(`head -c 1M /dev/urandom | dd of=${mnt} bs=1M seek=8 conv=notrunc status=none`).status).toBe(0);
    expect(sh(`head -c 4096 /dev/urandom | dd of=${mnt} bs=4096 seek=${(40 * MiB) / 4096} conv=notrunc status=none`).status).toBe(0);
    expect(await seek(mnt, 0, SEEK_DATA)).toBe(8 * MiB);
    expect(await seek(mnt, 8 * MiB + 5, SEEK_DATA)).toBe(8 * MiB + 5);
    expect(await seek(mnt, 8 * MiB, SEEK_HOLE)).toBe(9 * MiB);
    expect(await seek(mnt, 9 * MiB, SEEK_DATA)).toBe(40 * MiB);
    expect(await seek(mnt, 40 * MiB, SEEK_HOLE)).toBe(40 * MiB + 4096);
    expect(await seek(mnt, 40 * MiB + 4096, SEEK_DATA)).toBe('ENXIO');
    expect(await seek(mnt, 50 * MiB, SEEK_HOLE)).toBe(50 * MiB);
    expect(await seek(mnt, SIZE, SEEK_DATA)).toBe('ENXIO');
    expect(await seek(mnt, SIZE + 1, SEEK_HOLE)).toBe('ENXIO');
    // The mount agrees with the image file itself.
    for (const off of [0, 8 * MiB, 9 * MiB, 20 * MiB, 40 * MiB]) {
      expect(await seek(mnt, off, SEEK_DATA)).toBe(await seek(image, off, SEEK_DATA));
      expect(await seek(mnt, off, SEEK_HOLE)).toBe(await seek(image, off, SEEK_HOLE));
    }
  });

  it('cp --sparse=auto out of the mount makes a sparse copy with the same bytes', () => {
    // Its own layout: all holes but 1 MiB at 8 MiB and 4 KiB at 40 MiB.
    expect(sh(`fallocate -p -o 0 -l ${SIZE} ${mnt}`).status).toBe(0);
    expect(sh(`head -c 1M /dev/urandom | dd of=${mnt} bs=1M seek=8 conv=notrunc status=none`).status).toBe(0);
    expect(sh(`head -c 4096 /dev/urandom | dd of=${mnt} bs=4096 seek=${(40 * MiB) / 4096} conv=notrunc status=none`).status).toBe(0);
    const out = path.join(dir, 'sparse-copy.img');
    const r = sh(`cp --sparse=auto ${mnt} ${out}`);
    expect(r.status, r.stderr).toBe(0);
    expect(sh(`cmp ${out} ${image}`).status).toBe(0);
    // 1 MiB + 4 KiB of data in a 64 MiB disk: the copy holds little more than that.
    expect(fs.statSync(out).blocks * 512).toBeLessThan(2 * MiB);
    fs.rmSync(out);
  });

  it('fsync reaches the image file', () => {
    const r = sh(`printf durable | dd of=${mnt} bs=1 seek=4096 conv=notrunc,fsync status=none`);
    expect(r.status).toBe(0);
    expect(readImage(4096, 7).toString()).toBe('durable');
  });
});
