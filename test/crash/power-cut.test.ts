/**
 * Power loss: the guest workload runs on a real FUSE mount of a qcow2 overlay
 * whose host file sits under a recording node (recording-file.ts explains
 * why there). Each run's log is then replayed to crash points: right after
 * every write to the L1 table (where an L1 entry naming an L2 table that had
 * not been flushed yet would show), after every flush, and at random points;
 * at each, once with only the newest unsynced write surviving and once with a
 * random subset of the unsynced pages. Every resulting image must pass
 * `qemu-img check` (leaks allowed), open in vdisk, and read back every fsync'd write.
 * Every other run uses the smallest L2 cache, so that tables also go out in
 * the flushes a cache full of dirty tables forces, not only at guest fsyncs.
 *
 * CRASH_TRIALS=100 npx vitest run test/crash/power-cut.test.ts for a long run.
 */
import fs from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { openImage, resolveBackingPath } from '../../src/drivers/chain.js';
import { FileDriver } from '../../src/drivers/file.js';
import { Qcow2Driver } from '../../src/drivers/qcow2/index.js';
import { FuseExport } from '../../src/export/fuse-export.js';
import { useScratchDir } from '../helpers/env.js';
import { rng } from '../helpers/workload.js';
import { BLOCK, CONFIGS, checkBlocks, qemuCheck, clusterSizeOf, makeBacking, makeOps, makeOverlay, runOp, trialCount, type CrashState, type GuestOp, type ImageConfig } from './guest-workload.js';
import { RecordingFile, durablePrefix, replay, type LogRecord } from './recording-file.js';

let dir = '';
useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));
let backing = '';
beforeAll(() => {
  backing = path.join(dir, 'backing.raw');
  makeBacking(backing);
});

interface Run {
  cfg: ImageConfig;
  seed: number;
  ops: GuestOp[];
  base: Buffer;
  log: LogRecord[];
  /** Log length as op i started and after it returned. */
  opStart: number[];
  opEnd: number[];
}

/** The workload on a FUSE mount of `image`, opened the way `vdisk mount` opens it, over a recorder. */
async function recordRun(image: string, cfg: ImageConfig, seed: number, l2CacheBytes?: number): Promise<Run> {
  const base = fs.readFileSync(image);
  const fileNode = new BlockNode(await FileDriver.open(image, { growable: true }), { name: image });
  const recorder = new RecordingFile(fileNode);
  const drv = await Qcow2Driver.open(new BlockNode(recorder, { name: image }), l2CacheBytes ? { l2CacheBytes } : {});
  const backing = drv.header.backingFile ? await openImage(resolveBackingPath(image, drv.header.backingFile), { readOnly: true, format: 'raw' }) : null;
  const node = new BlockNode(drv, { name: image, backing });
  const mnt = `${image}.mnt`;
  fs.writeFileSync(mnt, '');
  const exp = await FuseExport.start(node, { mountpoint: mnt, directIo: true });
  const ops = makeOps(seed, cfg, 48);
  const opStart: number[] = [];
  const opEnd: number[] = [];
  try {
    const fh = await fs.promises.open(mnt, 'r+');
    try {
      for (const [i, op] of ops.entries()) {
        opStart.push(recorder.log.length);
        await runOp(fh, seed, op, i);
        opEnd.push(recorder.log.length);
      }
    } finally {
      await fh.close();
    }
  } finally {
    await exp.stop();
    await node.close();
    fs.rmSync(mnt);
  }
  return { cfg, seed, ops, base, log: recorder.log, opStart, opEnd };
}

/** Which guest fsyncs a power cut at log position `crash` must honour. */
function crashState(run: Run, crash: number): CrashState {
  const durable = durablePrefix(run.log, crash);
  let durableFsync = -1;
  let maybeEnd = 0;
  for (const [i, op] of run.ops.entries()) {
    if (run.opStart[i]! < crash) maybeEnd = i + 1;
    if (op.kind !== 'fsync') continue;
    // The fsync returned after its last flush completed: durable if that flush's coverage is.
    let covers = -1;
    for (let r = run.opStart[i]!; r < run.opEnd[i]!; r++) {
      const rec = run.log[r]!;
      if (rec.kind === 'flush') covers = rec.covers;
    }
    if (covers >= 0 && covers <= durable) durableFsync = i;
  }
  return { durableFsync, maybeEnd };
}

/**
 * Crash points: after writes to the L1 table (up to six, spread over the run)
 * and to the header (two), after two flushes, and at two random records.
 * `targeted` marks the L1 and header ones.
 */
function crashPoints(run: Run, rand: () => number): Array<{ crash: number; targeted: boolean }> {
  const l1Offset = Number(run.base.readBigUInt64BE(40));
  const l1Bytes = run.base.readUInt32BE(36) * 8;
  const l1Writes: number[] = [];
  const headerWrites: number[] = [];
  const flushes: number[] = [];
  for (const [i, r] of run.log.entries()) {
    if (r.kind === 'write' && r.offset < l1Offset + l1Bytes && l1Offset < r.offset + r.data.length) l1Writes.push(i + 1);
    if (r.kind === 'write' && r.offset === 0) headerWrites.push(i + 1);
    if (r.kind === 'flush') flushes.push(i + 1);
  }
  const spread = (list: number[], n: number) => (list.length <= n ? list : Array.from({ length: n }, (_, k) => list[Math.floor(((k + rand()) * list.length) / n)]!));
  const points = new Map<number, boolean>();
  for (const c of spread(flushes, 2)) points.set(c, false);
  for (let k = 0; k < 2; k++) points.set(1 + Math.floor(rand() * run.log.length), false);
  for (const c of spread(l1Writes, 6)) points.set(c, true);
  // The header moves to a grown refcount table (512+rc64): it alone surviving must be safe too.
  for (const c of spread(headerWrites, 2)) points.set(c, true);
  return [...points].sort((a, b) => a[0] - b[0]).map(([crash, targeted]) => ({ crash, targeted }));
}


/** qemu-img check, a reopen by vdisk and the fsync'd data of one replayed image. */
async function verify(file: string, run: Run, st: CrashState): Promise<string[]> {
  const problems: string[] = [];
  const qemu = qemuCheck(file);
  if (qemu) problems.push(qemu);
  let node: BlockNode;
  try {
    node = await openImage(file, { readOnly: true, format: 'qcow2' });
  } catch (err) {
    return [...problems, `vdisk cannot open it: ${(err as Error).message}`];
  }
  try {
    const read = async (b: number) => {
      const buf = Buffer.alloc(BLOCK);
      await io.preadv(node, b * BLOCK, BLOCK, [buf]);
      return buf;
    };
    problems.push(...(await checkBlocks(read, run.seed, run.ops, run.cfg, st)));
  } catch (err) {
    problems.push(`vdisk cannot read it: ${(err as Error).message}`);
  } finally {
    await node.close();
  }
  return problems;
}

describe('power cut (replayed host-file writes and syncs)', () => {
  it("every crash point leaves a consistent qcow2 overlay that holds all fsync'd data", async () => {
    const trials = trialCount(CONFIGS.length);
    const failures: string[] = [];
    let images = 0;
    let bad = 0;
    for (let t = 0; t < trials; t++) {
      const cfg = CONFIGS[t % CONFIGS.length]!;
      const seed = 7001 + t;
      const image = path.join(dir, `pc${t}.qcow2`);
      makeOverlay(image, cfg, backing);
      // Every other run with the smallest L2 cache: dirty tables then go out in the flushes a full cache forces.
      const run = await recordRun(image, cfg, seed, t % 2 ? 4 * clusterSizeOf(cfg) : undefined);
      const rand = rng(Math.imul(seed, 0x9e3779b1) ^ 0x5a5a5a5a);
      const replayed = path.join(dir, `pc${t}-crash.qcow2`);
      for (const { crash, targeted } of crashPoints(run, rand)) {
        const st = crashState(run, crash);
        const subsets: Array<[string, (rec: number, page: number) => boolean]> = [['random unsynced pages', () => rand() < 0.5]];
        // Right after an L1 or header write: that write alone survives, whatever it names.
        if (targeted) subsets.push(['only the newest unsynced write', (rec) => rec === crash - 1]);
        for (const [how, survives] of subsets) {
          fs.writeFileSync(replayed, replay(run.base, run.log, crash, survives));
          images++;
          const problems = await verify(replayed, run, st);
          if (problems.length) bad++;
          for (const p of problems) failures.push(`seed ${seed} (${cfg.name}), crash at record ${crash}/${run.log.length}, ${how}: ${p}`);
        }
      }
      fs.rmSync(image);
      fs.rmSync(replayed, { force: true });
    }
    expect(failures.slice(0, 12), `${bad} of ${images} crash images are bad`).toEqual([]);
    expect(images).toBeGreaterThan(trials * 4);
  }, 120_000 + trialCount(CONFIGS.length) * 10_000); // a long run (CRASH_TRIALS) gets the time it needs

  it('a flush costs one host flush per dependency step, however many tables it writes', async () => {
    const image = path.join(dir, 'flushes.qcow2');
    makeOverlay(image, { name: '64k', options: 'cluster_size=65536', size: 64 * 1024 ** 3, backing: false }, backing);
    const recorder = new RecordingFile(new BlockNode(await FileDriver.open(image, { growable: true }), { name: image }));
    const node = new BlockNode(await Qcow2Driver.open(new BlockNode(recorder, { name: image })), { name: image });
    const tableSpan = 8192 * 65536;
    const flushesFor = async (change: () => Promise<void>) => {
      const from = recorder.log.length;
      await change();
      await io.flush(node);
      return recorder.log.slice(from).filter((r) => r.kind === 'flush').length;
    };
    const cluster = Buffer.alloc(65536, 1);
    try {
      // 16 new L2 tables: data and refcounts, then the tables, then L1.
      expect(await flushesFor(async () => {
        for (let t = 0; t < 16; t++) await io.pwritev(node, t * tableSpan, cluster.length, [cluster]);
      })).toBe(3);
      // New clusters in 16 existing tables: L1 does not change.
      expect(await flushesFor(async () => {
        for (let t = 0; t < 16; t++) await io.pwritev(node, t * tableSpan + 65536, cluster.length, [cluster]);
      })).toBe(2);
      // Rewrites in place: only the data.
      expect(await flushesFor(async () => {
        for (let t = 0; t < 16; t++) await io.pwritev(node, t * tableSpan, cluster.length, [cluster]);
      })).toBe(1);
    } finally {
      await node.close();
    }
  });
});
