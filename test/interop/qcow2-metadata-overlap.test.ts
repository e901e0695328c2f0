/**
 * Metadata overlap (issue 9): images made by qemu, patched so that a data
 * cluster, a table or an allocation lands on other metadata. vdisk must mark
 * the image corrupt and refuse writes instead of writing through aliased
 * tables, and `check -r all` must not "repair" an overlap into an image
 * qemu-img calls broken. A healthy image gets no false positives (the
 * interop and fio suites run on healthy images).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/drivers/chain.js';
import { Qcow2Driver } from '../../src/drivers/qcow2/index.js';
import { useScratchDir } from '../helpers/env.js';
import { qemuImgCheck } from '../helpers/image.js';
import { Mount, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils' } }, (d) => (dir = d));

const KiB = 1024;
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00fffffffffffe00n;

function ok(cmd: string): string {
  const r = sh(cmd);
  expect(r.status, `${cmd}\n${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

/** A 64 MiB qcow2 made by qemu with 0x5a in guest clusters 0 and 1. */
function sample(name: string, clusterSize = 64 * KiB): string {
  const image = path.join(dir, name);
  ok(`qemu-img create -q -f qcow2 -o cluster_size=${clusterSize} ${image} 64M`);
  ok(`qemu-io -c "write -P 0x5a 0 ${2 * clusterSize}" ${image}`);
  return image;
}

/** Where qemu put the tables of a sample image. */
function layout(b: Buffer) {
  const l1 = Number(b.readBigUInt64BE(40));
  const refcountTable = Number(b.readBigUInt64BE(48));
  return {
    l1,
    refcountTable,
    l2: Number(b.readBigUInt64BE(l1) & OFFSET_MASK),
    refcountBlock: Number(b.readBigUInt64BE(refcountTable) & OFFSET_MASK),
  };
}

function patch(image: string, edit: (b: Buffer) => void): void {
  const b = fs.readFileSync(image);
  edit(b);
  fs.writeFileSync(image, b);
}

function markedCorrupt(image: string): boolean {
  const info = JSON.parse(ok(`qemu-img info --output=json ${image}`)) as { 'format-specific'?: { data?: { corrupt?: boolean } } };
  return info['format-specific']?.data?.corrupt === true;
}

/** write(2) then fsync(2) through the mount: the errno code if either fails, else 'ok'. */
function writeAndSync(file: string, offset: number, data: Buffer): string {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.fsyncSync(fd);
    return 'ok';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  } finally {
    fs.closeSync(fd);
  }
}

function readAt(file: string, offset: number, bytes: number): Buffer | string {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(bytes);
    fs.readSync(fd, b, 0, bytes, offset);
    return b;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  } finally {
    fs.closeSync(fd);
  }
}

/** Guest cluster 1's L2 entry names the refcount block: its data and the refcounts share a cluster. */
function l2EntryIntoRefcountBlock(name: string): string {
  const image = sample(name);
  patch(image, (b) => {
    const t = layout(b);
    b.writeBigUInt64BE(COPIED | BigInt(t.refcountBlock), t.l2 + 8);
  });
  return image;
}

describe('qcow2 metadata overlap', () => {
  it('an L2 entry into a refcount block: check names the overlap, check -r all repairs nothing and leaves the image as qemu-img saw it', () => {
    const image = l2EntryIntoRefcountBlock('l2-into-refblock.qcow2');
    const before = qemuImgCheck(image);
    expect(before.corruptions, before.output).toBeGreaterThan(0);
    const bytesBefore = fs.readFileSync(image);

    const plain = vdisk(['check', image]);
    expect(plain.status, plain.stdout + plain.stderr).toBe(2);
    expect(plain.stdout).toMatch(/data cluster of guest cluster 1 at \d+ overlaps the refcount block/);

    // Raising the refcount to 2 (today's "repair") leaves a refcount block qemu-img calls broken.
    const r = vdisk(['check', '-r', 'all', image]);
    expect(r.stdout, r.stderr).toMatch(/Not repairing anything: 1 data clusters overlap metadata/);
    expect(r.status, r.stdout + r.stderr).toBe(2);
    const after = qemuImgCheck(image);
    expect({ corruptions: after.corruptions, leaks: after.leaks, checkErrors: after.checkErrors }, after.output).toEqual({
      corruptions: before.corruptions,
      leaks: before.leaks,
      checkErrors: before.checkErrors,
    });
    expect(fs.readFileSync(image).equals(bytesBefore)).toBe(true);

    // qemu's own repair rebuilds the refcounts elsewhere and then finds the image clean.
    ok(`qemu-img check -q -r all ${image}`);
    expect(qemuImgCheck(image).corruptions).toBe(0);
  });

  it('a compressed cluster inside a refcount block: check -r all repairs nothing, qemu-img sees the image as before', () => {
    const image = path.join(dir, 'compressed-into-refblock.qcow2');
    ok(`qemu-img create -q -f qcow2 ${image} 64M`);
    ok(`qemu-io -c "write -c -P 0x5a 0 64k" ${image}`);
    patch(image, (b) => {
      const t = layout(b);
      // 64 KiB clusters: offset in bits 0-53, sector count above it; keep the count, move the offset.
      const entry = b.readBigUInt64BE(t.l2);
      expect(entry >> 62n).toBe(1n);
      b.writeBigUInt64BE((entry & ~((1n << 54n) - 1n)) | BigInt(t.refcountBlock), t.l2);
    });
    const before = qemuImgCheck(image);
    const bytesBefore = fs.readFileSync(image);
    const r = vdisk(['check', '-r', 'all', image]);
    expect(r.stdout, r.stderr).toMatch(/ERROR compressed cluster of guest cluster 0 at \d+ overlaps the refcount block/);
    expect(r.status, r.stdout + r.stderr).toBe(2);
    expect(qemuImgCheck(image).corruptions, before.output).toBe(before.corruptions);
    expect(fs.readFileSync(image).equals(bytesBefore)).toBe(true);
  });

  it('an L2 entry into a refcount block: a writable mount answers EIO for that cluster, marks the image corrupt and refuses writes', async () => {
    const image = l2EntryIntoRefcountBlock('l2-into-refblock-mount.qcow2');
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      expect(readAt(mnt, 0, 64 * KiB)).toEqual(Buffer.alloc(64 * KiB, 0x5a)); // unaffected data still reads
      expect(readAt(mnt, 64 * KiB, 64 * KiB)).toBe('EIO');
      expect(writeAndSync(mnt, 0, Buffer.alloc(64 * KiB, 0xab))).toBe('EIO');
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/the image is corrupt \(the data of guest cluster 1 at \d+ overlaps the refcount block at \d+\): writes are refused/);
    expect(markedCorrupt(image)).toBe(true);
    ok(`qemu-io -r -c "read -P 0x5a 0 64k" ${image}`);
    // The next writable mount serves it read-only, as for any image with the corrupt bit.
    const again = await Mount.start(image, mnt);
    await again.stop();
    expect(again.stderr).toMatch(/marked corrupt: opened read-only/);
  });

  it('an L2 entry into a refcount block on a dirty image: the refcount rebuild at open refuses, marks corrupt, changes nothing else', async () => {
    const image = l2EntryIntoRefcountBlock('l2-into-refblock-dirty.qcow2');
    patch(image, (b) => b.writeBigUInt64BE(b.readBigUInt64BE(72) | 1n, 72)); // dirty bit: refcounts are rebuilt on open
    const before = qemuImgCheck(image);
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      expect(writeAndSync(mnt, 0, Buffer.alloc(64 * KiB, 0xab))).toBe('EIO');
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/the image is corrupt \(data clusters overlap metadata\): marked corrupt, writes are refused/);
    expect(markedCorrupt(image)).toBe(true);
    const after = qemuImgCheck(image);
    expect(after.corruptions, after.output).toBe(before.corruptions);
    ok(`qemu-io -r -c "read -P 0x5a 0 64k" ${image}`);
  });

  it('a refcount table aliasing the L1 table: the mount refuses writes instead of letting a punch drop fsync\'d data', async () => {
    const image = sample('reftable-on-l1.qcow2');
    patch(image, (b) => {
      const l1 = layout(b).l1;
      b.writeBigUInt64BE(BigInt(l1), 48);
      // Without their COPIED bits the L1 entries read as in-file refcount block
      // offsets (a refcount table entry's bits 56-63 are offset bits: with bit 63
      // set the table would be refused at open as pointing outside the file).
      for (let i = 0; i < b.readUInt32BE(36); i++) b.writeUInt8(b.readUInt8(l1 + 8 * i) & 0x7f, l1 + 8 * i);
    });
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    let acknowledged: string;
    try {
      acknowledged = writeAndSync(mnt, 4 * 64 * KiB, Buffer.alloc(64 * KiB, 0xab));
      // A punch elsewhere: its refcount decrement lands in the L2 table today.
      sh(`fallocate -p -o ${64 * KiB} -l ${64 * KiB} ${mnt}`);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    if (acknowledged === 'ok') ok(`qemu-io -r -c "read -P 0xab 256k 64k" ${image}`); // fsync'd data must be there
    expect(acknowledged).toBe('EIO');
    expect(m.stderr).toMatch(/the refcount table at \d+ overlaps the L1 table at \d+\): marked corrupt, writes are refused/);
    expect(markedCorrupt(image)).toBe(true);
    ok(`qemu-io -r -c "read -P 0x5a 0 128k" ${image}`);
    // Repairing refcounts would write them through the aliased tables.
    const r = vdisk(['check', '-r', 'all', image]);
    expect(r.stdout, r.stderr).toMatch(/ERROR the refcount table at \d+ overlaps the L1 table.*\nNot repairing anything: metadata tables overlap/);
    expect(r.status).toBe(2);
    expect(markedCorrupt(image)).toBe(true);
  });

  it('an allocation that would put a new L2 table on the L1 table (refcount 0) marks the image corrupt instead', async () => {
    // 4 KiB clusters: an L2 table maps 2 MiB, so zeroing at 8 MiB needs a new one.
    const image = sample('l1-refcount-zero.qcow2', 4 * KiB);
    patch(image, (b) => {
      const t = layout(b);
      b.writeUInt16BE(0, t.refcountBlock + 2 * (t.l1 / (4 * KiB))); // the L1 table's cluster looks free
    });
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      const r = sh(`fallocate -z -o ${8 * 1024 * KiB} -l ${4 * KiB} ${mnt} && sync ${mnt}`);
      expect(r.status, r.stderr).not.toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/a new cluster at \d+ overlaps the L1 table/);
    expect(markedCorrupt(image)).toBe(true);
    // The L1 table survived: qemu still reads the data through it.
    ok(`qemu-io -r -c "read -P 0x5a 0 8k" -c "read -P 0 8M 4k" ${image}`);
  });

  it('a snapshot whose L1 table is the active L1 table: the mount marks the image corrupt and refuses writes', async () => {
    const image = sample('snapshot-l1-on-l1.qcow2');
    ok(`qemu-img snapshot -c s1 ${image}`);
    patch(image, (b) => {
      const snapshots = Number(b.readBigUInt64BE(64));
      b.writeBigUInt64BE(BigInt(layout(b).l1), snapshots);
    });
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      expect(readAt(mnt, 0, 64 * KiB)).toEqual(Buffer.alloc(64 * KiB, 0x5a));
      // Today this write also rewrites the snapshot's view of guest cluster 0.
      expect(writeAndSync(mnt, 0, Buffer.alloc(64 * KiB, 0xab))).toBe('EIO');
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/the snapshot L1 table at \d+ overlaps the L1 table at \d+\): marked corrupt, writes are refused/);
    expect(markedCorrupt(image)).toBe(true);
  });

  it('check -r all clears the corrupt bit of an image it finds consistent, as qemu-img check -r all does', () => {
    const image = sample('corrupt-bit-only.qcow2');
    patch(image, (b) => b.writeBigUInt64BE(b.readBigUInt64BE(72) | 2n, 72));
    expect(markedCorrupt(image)).toBe(true);
    const r = vdisk(['check', '-r', 'all', image]);
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(markedCorrupt(image)).toBe(false);
    expect(qemuImgCheck(image).corruptions).toBe(0);
  });

  it('metadata ranges grow with the tables, not with references: 64k L1 entries naming one L2 table are one run', async () => {
    const image = path.join(dir, 'shared-l2.qcow2');
    ok(`qemu-img create -q -f qcow2 -o cluster_size=512 ${image} 2G`);
    ok(`qemu-io -c "write -P 1 0 512" ${image}`);
    patch(image, (b) => {
      const l1 = Number(b.readBigUInt64BE(40));
      const l1Size = b.readUInt32BE(36);
      const entry = b.readBigUInt64BE(l1);
      for (let i = 1; i < l1Size; i++) b.writeBigUInt64BE(entry, l1 + i * 8);
    });
    const node = await openImage(image, { format: 'qcow2', readOnly: true });
    try {
      const drv = node.driver as Qcow2Driver;
      expect(drv.header.l1Size).toBeGreaterThanOrEqual(65536);
      // header, L1 table, refcount table, refcount blocks, one L2 table.
      expect(drv['s'].metadataRanges.size).toBeLessThan(10);
    } finally {
      await node.close();
    }
  });
});
