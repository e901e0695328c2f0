/**
 * Reopening a qcow2 backing node read-write and back (graph.ts reopen, what a
 * commit job does to the image it writes into). Images are made by qemu-img;
 * what vdisk wrote is checked by qemu-img check and read back by qemu-io; the
 * writer's lock is probed by other processes (flock(1), a vdisk mount).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImgCheck, qemuImgInfo } from '../helpers/image.js';
import { MiB, Mount, sh } from '../helpers/vdisk.js';
import { openImage } from '../../src/drivers/chain.js';
import { reopen } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockNode } from '../../src/block/node.js';
import type { Qcow2Driver } from '../../src/drivers/qcow2/index.js';

let dir: string;
const SIZE = 16 * MiB;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', flock: 'util-linux' } }, (d) => (dir = d));

function ok(cmd: string): string {
  const r = sh(cmd);
  expect(r.status, `${cmd}\n${r.stderr}`).toBe(0);
  return r.stdout;
}

/** Does another process get the writer's lock on `file` right now? */
function lockIsFree(file: string): boolean {
  return sh(`flock -n -x ${file} true`).status === 0;
}

/** An overlay made by qemu-img on `base`, opened by vdisk: its backing node is `base`, read-only. */
async function openChain(base: string): Promise<{ top: BlockNode; node: BlockNode }> {
  const overlay = `${base}.top.qcow2`;
  ok(`qemu-img create -q -f qcow2 -b ${path.basename(base)} -F qcow2 ${overlay}`);
  const top = await openImage(overlay);
  const node = top.backing!;
  expect(node.name).toBe(base);
  expect(node.readOnly).toBe(true);
  return { top, node };
}

async function read(node: BlockNode, offset: number, bytes: number): Promise<Buffer> {
  const buf = Buffer.alloc(bytes);
  await io.preadv(node, offset, bytes, [buf]);
  return buf;
}

describe('qcow2 reopen', () => {
  it('a read-only backing node is reopened read-write (taking the lock), written, and reopened read-only (giving it back)', async () => {
    const base = path.join(dir, 'base.qcow2');
    ok(`qemu-img create -q -f qcow2 ${base} ${SIZE} && qemu-io -c "write -P 1 0 1M" ${base}`);
    const { top, node } = await openChain(base);
    try {
      await expect(io.pwritev(node, MiB, 4096, [Buffer.alloc(4096, 2)])).rejects.toMatchObject({ code: 'EROFS' });
      await reopen(node, false);
      expect(node.readOnly).toBe(false);
      expect(lockIsFree(base)).toBe(false);
      await io.pwritev(node, MiB, 2 * MiB, [Buffer.alloc(2 * MiB, 2)]);
      await io.pwriteZeroes(node, 0, 64 * 1024);
      await reopen(node, true);
      expect(node.readOnly).toBe(true);
      await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 3)])).rejects.toMatchObject({ code: 'EROFS' });
      await expect(io.pwriteZeroes(node, 0, 4096)).rejects.toMatchObject({ code: 'EROFS' });
      expect(lockIsFree(base)).toBe(true);
      // Everything was flushed: another process sees a clean image with the data, while vdisk still has it open.
      expectQemuClean(base);
      ok(`qemu-io -r -c "read -P 0 0 64k" -c "read -P 1 64k 960k" -c "read -P 2 1M 2M" -c "read -P 0 3M 1M" ${base}`);
      // And the overlay reads the new data through its backing node.
      expect((await read(top, MiB, 4096)).every((b) => b === 2)).toBe(true);
      expect((await read(top, 0, 4096)).every((b) => b === 0)).toBe(true);
    } finally {
      await top.close();
    }
    expectQemuClean(base);
    // A second round trip works too (the state a read-write reopen makes is itself reopenable).
    const again = await openChain(base);
    try {
      await reopen(again.node, false);
      await io.pwritev(again.node, 4 * MiB, 4096, [Buffer.alloc(4096, 4)]);
      await reopen(again.node, true);
      await reopen(again.node, false);
      await io.pwritev(again.node, 5 * MiB, 4096, [Buffer.alloc(4096, 5)]);
    } finally {
      await again.top.close();
    }
    expectQemuClean(base);
    ok(`qemu-io -r -c "read -P 2 1M 2M" -c "read -P 4 4M 4k" -c "read -P 5 5M 4k" ${base}`);
  });

  it('the dirty bit of a lazy-refcounts crash gets the refcounts rebuilt on the read-write reopen', async () => {
    const base = path.join(dir, 'dirty.qcow2');
    ok(`qemu-img create -q -f qcow2 -o lazy_refcounts=on ${base} ${SIZE}`);
    // qemu-io dies in the middle: refcounts are stale and the dirty bit stays set.
    sh(`qemu-io -c "write -P 3 0 3M" -c "sigraise 9" ${base}`);
    expect(qemuImgInfo(base)).toMatchObject({ 'dirty-flag': true });
    expect(qemuImgCheck(base).corruptions).toBeGreaterThan(0);
    const { top, node } = await openChain(base);
    try {
      // Opened read-only through the chain: nothing was repaired yet.
      expect(fs.readFileSync(base).readBigUInt64BE(72) & 1n).toBe(1n);
      await reopen(node, false);
      expect((node.driver as Qcow2Driver).warnings.join('\n')).toMatch(/dirty bit.*refcounts rebuilt/);
      expect(fs.readFileSync(base).readBigUInt64BE(72) & 1n).toBe(0n);
      await io.pwritev(node, 8 * MiB, MiB, [Buffer.alloc(MiB, 6)]);
      await reopen(node, true);
    } finally {
      await top.close();
    }
    expect(qemuImgInfo(base)).toMatchObject({ 'dirty-flag': false });
    expectQemuClean(base);
    ok(`qemu-io -r -c "read -P 3 0 3M" -c "read -P 6 8M 1M" ${base}`);
  });

  it('a corrupt-bit image refuses the read-write reopen and stays read-only and readable', async () => {
    const base = path.join(dir, 'corrupt.qcow2');
    ok(`qemu-img create -q -f qcow2 ${base} ${SIZE} && qemu-io -c "write -P 7 0 1M" ${base}`);
    const hdr = fs.readFileSync(base);
    hdr.writeBigUInt64BE(hdr.readBigUInt64BE(72) | 2n, 72);
    fs.writeFileSync(base, hdr);
    const before = fs.readFileSync(base);
    const { top, node } = await openChain(base);
    try {
      await expect(reopen(node, false)).rejects.toMatchObject({ code: 'ERR_IMAGE_CORRUPT', message: expect.stringMatching(/cannot be reopened read-write: .*marked corrupt/) });
      expect(node.readOnly).toBe(true);
      // The host file went back to read-only: the lock is free, and the node still reads.
      expect(lockIsFree(base)).toBe(true);
      expect((await read(node, 0, MiB)).every((b) => b === 7)).toBe(true);
      await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096)])).rejects.toMatchObject({ code: 'EROFS' });
    } finally {
      await top.close();
    }
    expect(fs.readFileSync(base).equals(before)).toBe(true);
  });

  it('a read-write reopen while another process holds the writer lock fails with EBUSY; the node stays read-only and readable', async () => {
    const base = path.join(dir, 'busy.qcow2');
    ok(`qemu-img create -q -f qcow2 ${base} ${SIZE} && qemu-io -c "write -P 8 0 1M" ${base}`);
    const { top, node } = await openChain(base);
    try {
      // A vdisk mount of the same image holds its writer lock.
      const m = await Mount.start(base, `${base}.mnt`);
      try {
        await expect(reopen(node, false)).rejects.toMatchObject({ code: 'EBUSY', message: expect.stringMatching(/cannot be reopened read-write: .*in use by another process/) });
        expect(node.readOnly).toBe(true);
        expect((await read(node, 0, MiB)).every((b) => b === 8)).toBe(true);
        await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096)])).rejects.toMatchObject({ code: 'EROFS' });
      } finally {
        expect(await m.stop()).toBe(0);
      }
      // With the other writer gone, the reopen succeeds.
      await reopen(node, false);
      await io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 9)]);
      await reopen(node, true);
    } finally {
      await top.close();
    }
    expectQemuClean(base);
    ok(`qemu-io -r -c "read -P 9 0 4k" -c "read -P 8 4k 1020k" ${base}`);
  });
  it('persistent dirty bitmaps (and their autoclear bit) are dropped with a warning on the read-write reopen', async () => {
    const base = path.join(dir, 'bitmap.qcow2');
    ok(`qemu-img create -q -f qcow2 ${base} ${SIZE} && qemu-io -c "write -P 1 0 1M" ${base} && qemu-img bitmap --add ${base} b0`);
    expect(JSON.stringify(qemuImgInfo(base))).toContain('"b0"');
    const { top, node } = await openChain(base);
    try {
      await reopen(node, false);
      expect((node.driver as Qcow2Driver).warnings.join('\n')).toMatch(/dropped its persistent dirty bitmaps/);
      expect((node.driver as Qcow2Driver).header.autoclearFeatures).toBe(0n);
      await io.pwritev(node, 2 * MiB, MiB, [Buffer.alloc(MiB, 2)]);
      await reopen(node, true);
    } finally {
      await top.close();
    }
    expect(JSON.stringify(qemuImgInfo(base))).not.toContain('"b0"');
    expectQemuClean(base);
    ok(`qemu-io -r -c "read -P 1 0 1M" -c "read -P 2 2M 1M" ${base}`);
  });

  it('writes issued while a reopen to read-only is under way land before its flush or are refused: none is lost', async () => {
    const base = path.join(dir, 'race.qcow2');
    ok(`qemu-img create -q -f qcow2 -o cluster_size=4k ${base} ${SIZE}`);
    const { top, node } = await openChain(base);
    const landed: number[] = [];
    try {
      await reopen(node, false);
      const writes: Array<Promise<void>> = [];
      const back = reopen(node, true);
      // Writes issued while the reopen is under way (graph.ts flushes before the driver's reopen runs).
      for (let i = 0; i < 64; i++) {
        writes.push(
          io.pwritev(node, i * 64 * 1024, 4096, [Buffer.alloc(4096, 1 + (i % 250))]).then(
            () => void landed.push(i),
            (err: { code?: string }) => expect(err.code).toBe('EROFS'),
          ),
        );
        await Promise.resolve();
      }
      await back;
      await Promise.all(writes);
      expect(node.readOnly).toBe(true);
    } finally {
      await top.close();
    }
    expectQemuClean(base);
    const reads = landed.map((i) => `-c "read -P ${1 + (i % 250)} ${i * 64 * 1024} 4k"`).join(' ');
    if (reads) ok(`qemu-io -r ${reads} ${base}`);
  });
});
