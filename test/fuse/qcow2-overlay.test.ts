/** A qcow2 overlay on a backing file with data, through the mount: zero, punch, seek, space. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImg, qemuImgMap } from '../helpers/image.js';
import { MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';
import { native, SEEK_DATA, SEEK_HOLE } from '../../src/native.js';

let dir: string;
const SIZE = 64 * MiB;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

/** A raw base full of 0xbb except a hole at [16M, 18M). */
function makeBase(): string {
  const base = path.join(dir, 'base.raw');
  if (!fs.existsSync(base)) {
    const data = Buffer.alloc(SIZE, 0xbb);
    data.fill(0, 16 * MiB, 18 * MiB);
    fs.writeFileSync(base, data);
  }
  return base;
}

function read(file: string, offset: number, bytes: number): Buffer {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(bytes);
  fs.readSync(fd, b, 0, bytes, offset);
  fs.closeSync(fd);
  return b;
}

function qemuMap(image: string): Array<{ start: number; length: number; depth: number; zero: boolean; data: boolean; present: boolean }> {
  return qemuImgMap(image);
}

function mapAt(image: string, offset: number) {
  return qemuMap(image).find((e) => e.start <= offset && offset < e.start + e.length);
}

async function overlay(name: string, opts = 'compat=1.1'): Promise<{ image: string; mnt: string; m: Mount }> {
  const image = path.join(dir, `${name}.qcow2`);
  const r = vdisk(['create', '-f', 'qcow2', '-o', opts, '-b', makeBase(), '-F', 'raw', image]);
  expect(r.status, r.stderr).toBe(0);
  const mnt = `${image}.mnt`;
  return { image, mnt, m: await Mount.start(image, mnt) };
}

describe('qcow2 overlay through the mount', () => {
  it('punch and zero-range, aligned or not, leave the range reading zero over backing data', async () => {
    for (const opts of ['compat=1.1', 'compat=0.10', 'compat=1.1,extended_l2=on']) {
      const { image, mnt, m } = await overlay(`zero-${opts.replace(/\W+/g, '-')}`, opts);
      try {
        const ranges: Array<[string, number, number]> = [
          ['-p', 4 * MiB, MiB],
          ['-p', 10 * MiB + 1000, 70000],
          ['-z', 20 * MiB, 2 * MiB],
          ['-z', 30 * MiB + 512 * 3, 4097],
        ];
        for (const [flag, off, len] of ranges) {
          const r = sh(`fallocate ${flag} -o ${off} -l ${len} ${mnt}`);
          expect(r.status, r.stderr).toBe(0);
          expect(read(mnt, off, len).every((b) => b === 0), `${opts} ${flag} ${off}+${len}`).toBe(true);
          expect(read(mnt, off - 1, 1)[0]).toBe(0xbb);
          expect(read(mnt, off + len, 1)[0]).toBe(0xbb);
        }
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expectQemuClean(image);
      const raw = `${image}.raw`;
      qemuImg(`convert -O raw ${image} ${raw}`);
      expect(read(raw, 10 * MiB + 1000, 70000).every((b) => b === 0)).toBe(true);
      expect(read(raw, 30 * MiB + 1536, 4097).every((b) => b === 0)).toBe(true);
      fs.rmSync(raw);
    }
  });

  it('an unaligned zero-range in a cluster that otherwise reads zero allocates no data cluster', async () => {
    const { image, mnt, m } = await overlay('no-alloc');
    try {
      // [16M, 18M) is a hole in the base: zeroing a few bytes there needs no data.
      expect(sh(`fallocate -z -o ${16 * MiB + 100} -l 1000 ${mnt} && sync ${mnt}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    const e = mapAt(image, 16 * MiB);
    expect(e).toMatchObject({ depth: 0, present: true, zero: true, data: false });
    // Only metadata was added: header, refcounts, L1, one L2 table.
    expect(qemuMap(image).some((x) => x.depth === 0 && x.data)).toBe(false);
  });

  it('fallocate -z of 1 GiB on a v3 image is metadata: the file grows by less than 1 MiB', async () => {
    const image = path.join(dir, 'big.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', image, '2G']).status).toBe(0);
    const before = fs.statSync(image).size;
    const m = await Mount.start(image, `${image}.mnt`);
    try {
      const r = sh(`fallocate -z -o ${256 * MiB} -l ${1024 * MiB} ${image}.mnt && sync ${image}.mnt`);
      expect(r.status, r.stderr).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(fs.statSync(image).size - before).toBeLessThan(MiB);
    const e = mapAt(image, 512 * MiB);
    expect(e).toMatchObject({ zero: true, data: false, present: true });
    expectQemuClean(image);
  });

  it('punch returns space to the host, and SEEK_HOLE finds the zero clusters', async () => {
    const image = path.join(dir, 'space.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-o', 'cluster_size=64k', image, '64M']).status).toBe(0);
    const m = await Mount.start(image, `${image}.mnt`);
    const mnt = `${image}.mnt`;
    try {
      expect(sh(`head -c ${16 * MiB} /dev/urandom | dd of=${mnt} bs=1M seek=8 conv=notrunc,fsync status=none`).status).toBe(0);
      const du1 = fs.statSync(image).blocks;
      expect(du1 * 512).toBeGreaterThan(16 * MiB);
      expect(sh(`fallocate -p -o ${12 * MiB} -l ${8 * MiB} ${mnt} && sync ${mnt}`).status).toBe(0);
      const du2 = fs.statSync(image).blocks;
      expect(du1 - du2).toBeGreaterThanOrEqual((8 * MiB) / 512 - 16);
      // The punched range is a hole; the data around it is data.
      const fd = fs.openSync(mnt, 'r');
      try {
        expect(await native().lseek(fd, 8 * MiB, SEEK_HOLE)).toBe(12 * MiB);
        expect(await native().lseek(fd, 12 * MiB, SEEK_DATA)).toBe(20 * MiB);
        expect(await native().lseek(fd, 0, SEEK_DATA)).toBe(8 * MiB);
        await expect(native().lseek(fd, 24 * MiB, SEEK_DATA)).rejects.toMatchObject({ code: 'ENXIO' });
      } finally {
        fs.closeSync(fd);
      }
      // Freeing the last clusters shrinks the file itself.
      const sizeBefore = fs.statSync(image).size;
      expect(sh(`fallocate -p -o ${20 * MiB} -l ${4 * MiB} ${mnt} && sync ${mnt}`).status).toBe(0);
      expect(fs.statSync(image).size).toBeLessThan(sizeBefore);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(image);
  });

  it('punch on a qcow2 with nothing below is a discard: whole clusters become unallocated, the partial ones zeroed', async () => {
    const image = path.join(dir, 'discard.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-o', 'cluster_size=64k', image, '64M']).status).toBe(0);
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    const data = Buffer.alloc(16 * MiB);
    for (let i = 0; i < data.length; i += 4096) data.fill((i / 4096) % 251 + 1, i, i + 4096);
    try {
      fs.writeFileSync(`${dir}/discard.data`, data);
      expect(sh(`dd if=${dir}/discard.data of=${mnt} bs=1M seek=8 conv=notrunc,fsync status=none`).status).toBe(0);
      // Unaligned at both ends: [12M+1000, 16M+3000).
      expect(sh(`fallocate -p -o ${12 * MiB + 1000} -l ${4 * MiB + 2000} ${mnt} && sync ${mnt}`).status).toBe(0);
      const expected = Buffer.from(data);
      expected.fill(0, 4 * MiB + 1000, 8 * MiB + 3000);
      expect(read(mnt, 8 * MiB, 16 * MiB).equals(expected)).toBe(true);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    // As QEMU's qcow2 discard without a backing file: the clusters are gone, not zero clusters.
    expect(mapAt(image, 13 * MiB)).toMatchObject({ present: false, zero: true, data: false });
    expect(mapAt(image, 16 * MiB - 1)).toMatchObject({ present: false, zero: true });
    // The partial clusters at the edges keep their other bytes as data.
    expect(mapAt(image, 12 * MiB)).toMatchObject({ present: true, data: true });
    expect(mapAt(image, 16 * MiB)).toMatchObject({ present: true, data: true });
    expectQemuClean(image);
    // qemu reads the same bytes.
    qemuImg(`convert -f qcow2 -O raw ${image} ${image}.raw`);
    const expected = Buffer.from(data);
    expected.fill(0, 4 * MiB + 1000, 8 * MiB + 3000);
    expect(read(`${image}.raw`, 8 * MiB, 16 * MiB).equals(expected)).toBe(true);
  });

  it('punch on a qcow2 over a backing file leaves zero clusters, so the backing never shows through', async () => {
    const { image, mnt, m } = await overlay('punch-over-backing');
    try {
      expect(sh(`fallocate -p -o ${4 * MiB} -l ${2 * MiB} ${mnt} && sync ${mnt}`).status).toBe(0);
      expect(read(mnt, 4 * MiB, 2 * MiB).every((b) => b === 0)).toBe(true);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(mapAt(image, 5 * MiB)).toMatchObject({ depth: 0, present: true, zero: true, data: false });
    expectQemuClean(image);
  });
});
