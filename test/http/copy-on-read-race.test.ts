/**
 * Copy-on-read writes what it read from the backing node into the overlay
 * after the read: it must never overwrite a guest write that landed in the
 * same cluster meanwhile. Reads of unallocated clusters and writes
 * into the same clusters (other sectors of one cluster too) run at high
 * concurrency over a slow backing node; every written byte must survive.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import * as io from '../../src/block/io.js';
import { BlockNode } from '../../src/block/node.js';
import { openImage } from '../../src/drivers/chain.js';
import { BlkdebugDriver, type BlkdebugRule } from '../../src/drivers/blkdebug.js';
import { FileDriver } from '../../src/drivers/file.js';
import { Qcow2Driver } from '../../src/drivers/qcow2/index.js';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImgCheck, qemuImgMap, readImage } from '../helpers/image.js';
import { MiB, vdisk } from '../helpers/vdisk.js';
import { rng, seededData } from '../helpers/workload.js';

let dir: string;

useScratchDir({ fuse: false, tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

const SIZE = 8 * MiB;

/**
 * A copy-on-read qcow2 overlay (`vdisk create -o opts`) on a raw file holding
 * `base`, with blkdebug rules on the backing node and on the overlay's own file.
 */
async function overlay(
  name: string,
  base: Buffer,
  opts: string,
  rules: { backing?: BlkdebugRule[]; file?: BlkdebugRule[] } = {},
): Promise<{ top: BlockNode; image: string }> {
  const baseFile = path.join(dir, `${name}.base`);
  fs.writeFileSync(baseFile, base);
  const image = path.join(dir, `${name}.qcow2`);
  expect(vdisk(['create', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), '-b', baseFile, '-F', 'raw', image]).status).toBe(0);
  const withRules = (node: BlockNode, r: BlkdebugRule[] | undefined) => (r ? new BlockNode(new BlkdebugDriver(node, r), { name: `${node.name} (blkdebug)` }) : node);
  const backing = withRules(new BlockNode(await FileDriver.open(baseFile, { readOnly: true }), { name: baseFile }), rules.backing);
  const file = withRules(new BlockNode(await FileDriver.open(image, { growable: true }), { name: image }), rules.file);
  const drv = await Qcow2Driver.open(file);
  return { top: new BlockNode(drv, { name: image, backing, copyOnRead: true }), image };
}

describe('copy-on-read against concurrent writes', () => {
  it.each([
    ['64k clusters', 'cluster_size=64k'],
    ['extended L2, 32k clusters', 'cluster_size=32k,extended_l2=on'],
    ['4k clusters', 'cluster_size=4k'],
  ])('%s: 3000 mixed requests, every written byte survives', async (name, opts) => {
    const file = name.replace(/\W+/g, '-');
    const base = seededData(SIZE, file.length);
    const { top, image } = await overlay(file, base, opts, { backing: [{ op: 'read', delayMs: 2 }] });
    const model = Buffer.from(base);
    const rand = rng(1234);
    const ops: Array<Promise<void>> = [];
    let writes = 0;
    // Writes in flight together never overlap each other (their order would be
    // undefined); they overlap reads and copy-on-read freely, which is the point.
    let batchWrites: Array<[number, number]> = [];
    for (let i = 0; i < 3000; i++) {
      // Keep to 64 clusters so that reads and writes keep meeting in the same ones.
      const cluster = Math.floor(rand() * 64) * 65536;
      const offset = cluster + Math.floor(rand() * 128) * 512;
      const bytes = Math.min(SIZE - offset, (1 + Math.floor(rand() * 16)) * 512);
      if (rand() < 0.5 && !batchWrites.some(([a, b]) => offset < b && a < offset + bytes)) {
        batchWrites.push([offset, offset + bytes]);
        const data = Buffer.alloc(bytes, (i % 250) + 1);
        data.copy(model, offset);
        writes++;
        ops.push(io.pwritev(top, offset, bytes, [data]));
      } else {
        const buf = Buffer.alloc(bytes);
        ops.push(io.preadv(top, offset, bytes, [buf]));
      }
      if (ops.length >= 64) {
        await Promise.all(ops.splice(0));
        batchWrites = [];
      }
    }
    await Promise.all(ops);
    expect(writes).toBeGreaterThan(800);
    expect(top.corStats.bytesCopied).toBeGreaterThan(0);
    const all = Buffer.alloc(SIZE);
    await io.preadv(top, 0, SIZE, [all]);
    expect(all.equals(model)).toBe(true);
    await top.close();
    // And after closing: what is on disk is the same, and the image is consistent.
    expect((await readImage(image)).equals(model)).toBe(true);
    expectQemuClean(image);
  });

  it('copies whole clusters once, zero clusters as zero clusters, and a failed copy does not fail the read', async () => {
    const base = Buffer.alloc(SIZE, 0x61);
    base.fill(0, 2 * MiB, 3 * MiB); // a zero region in the backing file
    // The overlay's own file fails writes past 1 MiB with ENOSPC: copies there fail, reads must not.
    const { top, image } = await overlay('cor2', base, '', { file: [{ op: 'write', offset: 1024 * 1024, error: 'ENOSPC' }] });
    const a = Buffer.alloc(4096);
    await io.preadv(top, 100, 4096, [a]);
    expect(a.every((b) => b === 0x61)).toBe(true);
    expect(top.corStats.bytesFromBacking).toBe(65536); // the whole cluster, once
    await io.preadv(top, 200, 4096, [a]);
    expect(top.corStats.bytesFromBacking).toBe(65536); // now it comes from the overlay
    const z = Buffer.alloc(65536, 1);
    await io.preadv(top, 2 * MiB, 65536, [z]);
    expect(z.every((b) => b === 0)).toBe(true);
    expect(top.corStats.copyFailures).toBe(0);
    // Data copies into new clusters land past 1 MiB of the image file: they fail, the reads succeed.
    const big = Buffer.alloc(MiB);
    await io.preadv(top, 4 * MiB, MiB, [big]);
    expect(big.every((b) => b === 0x61)).toBe(true);
    await top.drain(); // the copies trail the read
    expect(top.corStats.copyFailures).toBeGreaterThan(0);
    // The failed copies cost nothing but the copies: the image closes cleanly, reads as the
    // backing file, and qemu-img finds no corruption (a cluster leaked by a failed copy is allowed).
    await top.close();
    expect((await readImage(image)).equals(base)).toBe(true);
    const c = qemuImgCheck(image);
    expect(c.corruptions, c.output).toBe(0);
    expect(c.checkErrors, c.output).toBe(0);
  });

  it('a compat=0.10 overlay (no zero clusters) gets zeroes read below as data, so it stops reading through', async () => {
    const baseFile = path.join(dir, 'v2.base');
    fs.writeFileSync(baseFile, '');
    fs.truncateSync(baseFile, SIZE); // a hole: block status says zero below
    const image = path.join(dir, 'v2.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', baseFile, '-F', 'raw', image]).status).toBe(0);
    const top = await openImage(image, { copyOnRead: true });
    const buf = Buffer.alloc(MiB, 1);
    await io.preadv(top, MiB, MiB, [buf]);
    expect(buf.every((b) => b === 0)).toBe(true);
    await top.close();
    const map = qemuImgMap(image);
    const here = map.filter((e) => e.start < 2 * MiB && e.start + e.length > MiB);
    expect(here.length).toBeGreaterThan(0);
    expect(here.every((e) => e.depth === 0)).toBe(true);
    expectQemuClean(image);
  });

  it('a read is answered before its copy lands; a write to that cluster waits for the copy and wins', async () => {
    // Every write to the overlay's file takes a while: the copy is still on its way when the read returns.
    const { top, image } = await overlay('trail', Buffer.alloc(SIZE, 0x62), '', { file: [{ op: 'write', delayMs: 200 }] });
    const buf = Buffer.alloc(MiB);
    await io.preadv(top, 2 * MiB, MiB, [buf]);
    expect(buf.every((b) => b === 0x62)).toBe(true);
    expect(top.corStats.bytesFromBacking).toBe(MiB);
    expect(top.corStats.bytesCopied).toBe(0);
    // A guest write into those clusters now must not be overwritten by the copy landing after it.
    await io.pwritev(top, 2 * MiB + 4096, 512, [Buffer.alloc(512, 0x77)]);
    expect(top.corStats.bytesCopied).toBe(MiB);
    const back = Buffer.alloc(8192);
    await io.preadv(top, 2 * MiB, 8192, [back]);
    expect(back.subarray(0, 4096).every((b) => b === 0x62)).toBe(true);
    expect(back.subarray(4096, 4608).every((b) => b === 0x77)).toBe(true);
    expect(back.subarray(4608).every((b) => b === 0x62)).toBe(true);
    await top.close();
    expectQemuClean(image);
  });
});
