/** qcow2 features against images made by qemu: chains, compression, snapshots, header bits. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImgCheck, qemuImgInfo, readImage } from '../helpers/image.js';
import { MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';
import { runWorkload } from '../helpers/workload.js';

let dir: string;
const SIZE = 16 * MiB;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

function ok(cmd: string): string {
  const r = sh(cmd);
  expect(r.status, `${cmd}\n${r.stderr}`).toBe(0);
  return r.stdout;
}

describe('qcow2 features', () => {
  it('a chain three deep: raw <- qcow2 (qemu) <- qcow2 (qemu) <- qcow2 (vdisk, written through the mount)', async () => {
    const base = path.join(dir, 'c0.raw');
    ok(`head -c ${SIZE} /dev/urandom > ${base}`);
    ok(`qemu-img create -q -f qcow2 -b c0.raw -F raw ${dir}/c1.qcow2`);
    ok(`qemu-io -c "write -P 1 1M 2M" -c "write -z 5M 1M" ${dir}/c1.qcow2`);
    ok(`qemu-img create -q -f qcow2 -o cluster_size=4k -b c1.qcow2 -F qcow2 ${dir}/c2.qcow2`);
    ok(`qemu-io -c "write -P 2 2M 512k" -c "discard 8M 1M" ${dir}/c2.qcow2`);
    const top = path.join(dir, 'c3.qcow2');
    // Relative backing names resolve against the overlay's directory, not the cwd.
    const r = sh(`cd / && node ${path.resolve('dist/cli/main.js')} create -f qcow2 -b c2.qcow2 -F qcow2 ${top}`);
    expect(r.status, r.stderr).toBe(0);
    const model = path.join(dir, 'chain.model.raw');
    ok(`qemu-img convert -O raw ${dir}/c2.qcow2 ${model}`);
    expect((await readImage(top)).equals(fs.readFileSync(model))).toBe(true);
    const info = JSON.parse(vdisk(['info', '--backing-chain', '--output', 'json', top]).stdout) as Array<{ format: string }>;
    expect(info.map((i) => i.format)).toEqual(['qcow2', 'qcow2', 'qcow2', 'raw']);
    const m = await Mount.start(top, `${top}.mnt`);
    try {
      await runWorkload(`${top}.mnt`, model, { seed: 99, size: SIZE, ops: 120, maxBytes: 200 * 1024 });
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(top);
    ok(`qemu-img compare -f qcow2 -F raw ${top} ${model}`);
    // vdisk map names the image of the chain that holds each range, like qemu-img map.
    const ours = JSON.parse(vdisk(['map', '--output', 'json', top]).stdout) as Array<{ start: number; depth: number }>;
    const theirs = JSON.parse(ok(`qemu-img map --output=json ${top}`)) as Array<{ start: number; depth: number }>;
    const depthAt = (list: Array<{ start: number; length?: number; depth: number }>, off: number) =>
      list.filter((e) => e.start <= off).pop()!.depth;
    for (let off = 0; off < SIZE; off += 256 * 1024) expect(depthAt(ours, off), `depth at ${off}`).toBe(depthAt(theirs, off));
  });

  it('compressed clusters (qemu-img convert -c, zlib and zstd) read right, and writes over them copy them out', async () => {
    const src = path.join(dir, 'comp-src.raw');
    const data = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4096) data.write(`block ${i} `.repeat(200), i, 4096);
    fs.writeFileSync(src, data);
    for (const [cs, type] of [['64k', 'zlib'], ['4k', 'zlib'], ['64k', 'zstd']] as const) {
      const image = path.join(dir, `comp-${cs}-${type}.qcow2`);
      ok(`qemu-img convert -c -O qcow2 -o cluster_size=${cs},compression_type=${type} ${src} ${image}`);
      expect((await readImage(image)).equals(data)).toBe(true);
      const model = path.join(dir, `comp-${cs}-${type}.model`);
      fs.copyFileSync(src, model);
      const m = await Mount.start(image, `${image}.mnt`);
      try {
        await runWorkload(`${image}.mnt`, model, { seed: 5, size: SIZE, ops: 60, maxBytes: 100 * 1024 });
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expectQemuClean(image);
      ok(`qemu-img compare -f qcow2 -F raw ${image} ${model}`);
    }
  });

  it('internal snapshots stay intact: writes copy shared clusters, the snapshot still reads its data', async () => {
    const image = path.join(dir, 'snap.qcow2');
    ok(`qemu-img create -q -f qcow2 ${image} ${SIZE}`);
    ok(`qemu-io -c "write -P 7 0 4M" -c "write -P 8 6M 1M" ${image}`);
    ok(`qemu-img snapshot -c s1 ${image}`);
    const before = path.join(dir, 'snap.before.raw');
    ok(`qemu-img convert -O raw ${image} ${before}`);
    const model = path.join(dir, 'snap.model.raw');
    fs.copyFileSync(before, model);
    const m = await Mount.start(image, `${image}.mnt`);
    try {
      await runWorkload(`${image}.mnt`, model, { seed: 17, size: SIZE, ops: 100, maxBytes: 300 * 1024 });
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(image);
    ok(`qemu-img compare -f qcow2 -F raw ${image} ${model}`);
    const snap = path.join(dir, 'snap.s1.raw');
    ok(`qemu-img convert -l snapshot.name=s1 -O raw ${image} ${snap}`);
    expect(fs.readFileSync(snap).equals(fs.readFileSync(before))).toBe(true);
    expect(ok(`qemu-img snapshot -l ${image}`)).toMatch(/s1/);
  });

  it('backing formats: recorded ones are used, a raw backing without one needs -F raw, loops are refused', async () => {
    const base = path.join(dir, 'fmt-base.raw');
    ok(`head -c ${MiB} /dev/urandom > ${base}`);
    const noFmt = path.join(dir, 'nofmt.qcow2');
    // qemu-img 7.2 refuses to create this without -F; write the header field by hand instead.
    ok(`qemu-img create -q -f qcow2 -b ${base} -F raw ${noFmt}`);
    const img = fs.readFileSync(noFmt);
    const extAt = img.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    expect(extAt).toBeGreaterThan(0);
    img.writeUInt32BE(0x12345678, extAt); // now an unknown extension: no backing format recorded
    fs.writeFileSync(noFmt, img);
    const refused = vdisk(['info', noFmt]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/^vdisk: error ERR_IMAGE_FORMAT: .*probes as raw.*-F raw/);
    expect(vdisk(['info', '-F', 'raw', noFmt]).status).toBe(0);
    expect((await readImage(noFmt, { backingFormat: 'raw' })).equals(fs.readFileSync(base))).toBe(true);

    const a = path.join(dir, 'loop-a.qcow2');
    const b = path.join(dir, 'loop-b.qcow2');
    ok(`qemu-img create -q -f qcow2 ${a} 1M && qemu-img create -q -f qcow2 -b ${a} -F qcow2 ${b}`);
    ok(`qemu-img rebase -u -b ${b} -F qcow2 ${a}`);
    const loop = vdisk(['info', b]);
    expect(loop.status).toBe(1);
    expect(loop.stderr).toMatch(/^vdisk: error ERR_IMAGE_CORRUPT: backing chain loops/);
  });

  it('the dirty bit from a lazy-refcounts crash is repaired on open; unknown header extensions survive the header rewrite', async () => {
    const image = path.join(dir, 'dirty.qcow2');
    ok(`qemu-img create -q -f qcow2 -o lazy_refcounts=on ${image} ${SIZE}`);
    // qemu-io dies in the middle: refcounts are stale and the dirty bit stays set.
    sh(`qemu-io -c "write -P 3 0 3M" -c "sigraise 9" ${image}`);
    const hdr = fs.readFileSync(image);
    expect(hdr.readBigUInt64BE(72) & 1n).toBe(1n);
    // Add an unknown header extension (type 0x7e57ab1e) after the known ones.
    const end = hdr.indexOf(Buffer.alloc(8), 112);
    const ext = Buffer.alloc(16);
    ext.writeUInt32BE(0x7e57ab1e, 0);
    ext.writeUInt32BE(5, 4);
    ext.write('hello', 8);
    ext.copy(hdr, end);
    fs.writeFileSync(image, hdr);
    // Before the mount: the refcounts really are stale (qemu-img sees the data clusters
    // unreferenced), and qemu still reads the header with the extension in it.
    const stale = qemuImgCheck(image);
    expect(stale.corruptions, stale.output).toBeGreaterThan(0);
    expect(qemuImgInfo(image)).toMatchObject({ 'dirty-flag': true });
    expect(fs.readFileSync(image).subarray(0, 4096).indexOf(ext)).toBe(end);
    const m = await Mount.start(image, `${image}.mnt`);
    expect(m.stderr).toMatch(/dirty bit.*refcounts rebuilt/);
    try {
      expect(sh(`dd if=${image}.mnt bs=1M count=3 status=none | tr -d '\\003' | wc -c`).stdout.trim()).toBe('0');
      ok(`printf x | dd of=${image}.mnt bs=1 seek=${5 * MiB} conv=notrunc,fsync status=none`);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    const after = fs.readFileSync(image);
    expect(after.readBigUInt64BE(72) & 1n).toBe(0n);
    expect(after.indexOf(Buffer.from('7e57ab1e', 'hex'))).toBeGreaterThan(0);
    expect(after.includes(Buffer.from('hello'))).toBe(true);
    expectQemuClean(image);
  });

  it('the corrupt bit opens read-only with a clear message', async () => {
    const image = path.join(dir, 'corrupt-bit.qcow2');
    ok(`qemu-img create -q -f qcow2 ${image} ${SIZE}`);
    const hdr = fs.readFileSync(image);
    hdr.writeBigUInt64BE(hdr.readBigUInt64BE(72) | 2n, 72);
    fs.writeFileSync(image, hdr);
    const m = await Mount.start(image, `${image}.mnt`);
    try {
      expect(m.stderr).toMatch(/marked corrupt: opened read-only/);
      expect(m.stderr).toMatch(/read-only\)/);
      expect(sh(`printf x | dd of=${image}.mnt conv=notrunc status=none`).stderr).toMatch(/Read-only file system/);
    } finally {
      expect(await m.stop()).toBe(0);
    }
  });
});
