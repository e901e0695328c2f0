/**
 * The guest side of the crash tests: a seeded list of writes, zero ranges,
 * punched holes and fsyncs on qcow2 overlays, run through a real FUSE mount,
 * and the check of what an image holds after a crash.
 *
 * Every sector a write puts down describes itself (which op wrote it, to
 * which sector), and so does every sector of the backing file, so a sector read
 * back after a crash names its version. A sector may hold the version it had at
 * the last fsync that completed before the crash, or that of any op issued
 * after that fsync; anything else (an older version, garbage) is lost or
 * corrupt fsync'd data.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { native, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../../src/native.js';
import { rng } from '../helpers/workload.js';
import { sh } from '../helpers/vdisk.js';

export const BLOCK = 4096;
const WRITE_MAGIC = 0x57524954;
const BACKING_MAGIC = 0x4241434b;
/** Backing files hold this many self-describing blocks; the overlays are larger (reads past it are zero). */
export const BACKING_BLOCKS = 4096; // 16 MiB

export interface ImageConfig {
  name: string;
  /** qemu-img create -o options. */
  options: string;
  /** Virtual size: big enough that random writes keep allocating new L2 tables. */
  size: number;
  backing: boolean;
  /**
   * Before the run, give every L2 table a zero cluster and take an internal
   * snapshot: every table is then shared, and the run's first change to each
   * copies it (the copy must be on disk before L1 names it, or the old mapping is lost).
   */
  snapshot?: boolean;
  /** Largest op in 4 KiB blocks (default 32). */
  maxBlocks?: number;
}

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
/** The overlays the crash tests cycle through. */
export const CONFIGS: ImageConfig[] = [
  { name: '64k+snapshot', options: 'cluster_size=65536', size: 8 * GiB, backing: false, snapshot: true },
  { name: '4k+backing', options: 'cluster_size=4096', size: 256 * MiB, backing: true },
  { name: 'extl2', options: 'cluster_size=65536,extended_l2=on', size: 4 * GiB, backing: false },
  { name: 'lazy+backing', options: 'cluster_size=65536,lazy_refcounts=on', size: 8 * GiB, backing: true },
  { name: '4k+snapshot', options: 'cluster_size=4096', size: 256 * MiB, backing: false, snapshot: true },
  { name: 'extl2+backing', options: 'cluster_size=65536,extended_l2=on', size: 4 * GiB, backing: true },
  { name: '64k+backing', options: 'cluster_size=65536', size: 8 * GiB, backing: true },
  { name: 'lazy', options: 'cluster_size=65536,lazy_refcounts=on', size: 8 * GiB, backing: false },
  // A 2 MiB refcount table: the run's few MiB of writes grow it (new blocks and table, then the header).
  { name: '512+rc64+backing', options: 'cluster_size=512,refcount_bits=64', size: 64 * MiB, backing: true, maxBlocks: 128 },
];

export type GuestOp =
  | { kind: 'write' | 'zero' | 'punch'; block: number; blocks: number }
  | { kind: 'fsync' };

/** `count` ops; half of them land in the first 16 MiB (over the backing data, and rewriting earlier ops). */
export function makeOps(seed: number, cfg: ImageConfig, count: number): GuestOp[] {
  const rand = rng(Math.imul(seed, 0x9e3779b1) ^ 0x1234567);
  const total = cfg.size / BLOCK;
  const ops: GuestOp[] = [];
  for (let i = 0; i < count; i++) {
    const r = rand();
    if (r < 0.15) {
      ops.push({ kind: 'fsync' });
      continue;
    }
    const blocks = 1 + Math.floor(rand() * rand() * (cfg.maxBlocks ?? 32));
    const span = rand() < 0.5 ? BACKING_BLOCKS : total;
    const block = Math.min(Math.floor(rand() * span), total - blocks);
    ops.push({ kind: r < 0.65 ? 'write' : r < 0.82 ? 'zero' : 'punch', block, blocks });
  }
  ops.push({ kind: 'fsync' });
  return ops;
}

/** Sectors describe themselves: a real disk may tear an unsynced write at any sector, and 512 B clusters tear blocks too. */
const SECTOR = 512;

function fillSector(buf: Buffer, at: number, magic: number, a: number, sector: number): void {
  buf.writeUInt32LE(magic, at);
  buf.writeUInt32LE(a >>> 0, at + 4);
  buf.writeUInt32LE(sector >>> 0, at + 8);
  for (let k = 12; k < SECTOR; k += 4) buf.writeUInt32LE((Math.imul(a + 1, 0x9e3779b1) ^ Math.imul(sector, 0x85ebca77) ^ Math.imul(k, 0xc2b2ae3d)) >>> 0, at + k);
}

function fillBlock(magic: number, a: number, block: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  for (let s = 0; s < BLOCK / SECTOR; s++) fillSector(buf, s * SECTOR, magic, a, block * (BLOCK / SECTOR) + s);
  return buf;
}

/** What op `op` of the run with seed `seed` writes to block `block`. */
export function writeBlock(seed: number, op: number, block: number): Buffer {
  return fillBlock(WRITE_MAGIC, seed * 100_000 + op, block);
}

export function backingBlock(block: number): Buffer {
  return fillBlock(BACKING_MAGIC, 0, block);
}

/** A raw backing file of self-describing blocks. */
export function makeBacking(file: string): void {
  const data = Buffer.alloc(BACKING_BLOCKS * BLOCK);
  for (let b = 0; b < BACKING_BLOCKS; b++) backingBlock(b).copy(data, b * BLOCK);
  fs.writeFileSync(file, data);
}

/** A fresh overlay for `cfg` (with its backing file `backing` when the config has one). */
export function makeOverlay(file: string, cfg: ImageConfig, backing: string): void {
  const b = cfg.backing ? `-b ${backing} -F raw` : '';
  const r = sh(`qemu-img create -q -f qcow2 -o ${cfg.options} ${b} ${file} ${cfg.size}`);
  if (r.status !== 0) throw new Error(`qemu-img create: ${r.stderr}`);
  if (!cfg.snapshot) return;
  // Zero clusters read as zero, which is what the model expects of a block without backing.
  const clusterSize = clusterSizeOf(cfg);
  const tableSpan = (clusterSize / 8) * clusterSize;
  const cmds: string[] = [];
  for (let off = 0; off < cfg.size; off += tableSpan) cmds.push(`-c 'write -z ${off} ${clusterSize}'`);
  const z = sh(`qemu-io -f qcow2 ${cmds.join(' ')} ${file} && qemu-img snapshot -c before ${file}`);
  if (z.status !== 0) throw new Error(`qemu-io/qemu-img snapshot: ${z.stderr}`);
}

export function clusterSizeOf(cfg: ImageConfig): number {
  return Number(/cluster_size=(\d+)/.exec(cfg.options)![1]);
}

/** The version of sector `s` of block `block`: 0 zero, -1 the backing file's, op+1 what op `op` wrote; NaN anything else. */
export function versionOf(buf: Buffer, seed: number, block: number, s: number): number {
  const sector = buf.subarray(s * SECTOR, (s + 1) * SECTOR);
  if (sector.every((x) => x === 0)) return 0;
  const magic = sector.readUInt32LE(0);
  const a = sector.readUInt32LE(4);
  const expected = Buffer.alloc(SECTOR);
  fillSector(expected, 0, magic, a, block * (BLOCK / SECTOR) + s);
  if (!sector.equals(expected)) return NaN;
  if (magic === BACKING_MAGIC && a === 0) return -1;
  if (magic === WRITE_MAGIC && a >= seed * 100_000) return a - seed * 100_000 + 1;
  return NaN;
}

function versionWritten(op: GuestOp, index: number): number {
  return op.kind === 'write' ? index + 1 : 0;
}

/** One op, asynchronously (a FUSE server in this very process must keep answering). */
export async function runOp(fh: fs.promises.FileHandle, seed: number, op: GuestOp, i: number): Promise<void> {
  if (op.kind === 'fsync') return fh.sync();
  const offset = op.block * BLOCK;
  const bytes = op.blocks * BLOCK;
  if (op.kind === 'write') {
    const data = Buffer.concat(Array.from({ length: op.blocks }, (_, k) => writeBlock(seed, i, op.block + k)));
    const { bytesWritten } = await fh.write(data, 0, bytes, offset);
    if (bytesWritten !== bytes) throw new Error(`short write ${bytesWritten}/${bytes}`);
    return;
  }
  const mode = op.kind === 'zero' ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  await native().fallocate(fh.fd, mode, offset, bytes);
}

export interface CrashState {
  /** Index of the last op that is an fsync known to be durable (-1: none). */
  durableFsync: number;
  /** Ops [durableFsync+1, maybeEnd) may or may not have reached the image. */
  maybeEnd: number;
}

/**
 * Compare an image after a crash with the model. `read(block)` reads one
 * block through vdisk. Returns problems, one line each (empty: all good).
 */
export async function checkBlocks(read: (block: number) => Promise<Buffer>, seed: number, ops: GuestOp[], cfg: ImageConfig, st: CrashState): Promise<string[]> {
  // Per touched block: the version at the durable fsync, and the later ones that may have landed.
  const durable = new Map<number, number>();
  const maybe = new Map<number, Set<number>>();
  for (let i = 0; i < st.maybeEnd; i++) {
    const op = ops[i]!;
    if (op.kind === 'fsync') continue;
    for (let b = op.block; b < op.block + op.blocks; b++) {
      if (i < st.durableFsync) durable.set(b, versionWritten(op, i));
      else {
        if (!maybe.has(b)) maybe.set(b, new Set());
        maybe.get(b)!.add(versionWritten(op, i));
      }
    }
  }
  const problems: string[] = [];
  const blocks = [...new Set([...durable.keys(), ...maybe.keys()])].sort((a, b) => a - b);
  for (const b of blocks) {
    const base = cfg.backing && b < BACKING_BLOCKS ? -1 : 0;
    const allowed = new Set([durable.get(b) ?? base, ...(maybe.get(b) ?? [])]);
    const buf = await read(b);
    for (let s = 0; s < BLOCK / SECTOR; s++) {
      const got = versionOf(buf, seed, b, s);
      if (allowed.has(got)) continue;
      const name = (v: number) => (Number.isNaN(v) ? 'garbage' : v === 0 ? 'zero' : v === -1 ? 'backing' : `op ${v - 1}`);
      problems.push(`block ${b} sector ${s}: reads ${name(got)}, fsync'd state allows ${[...allowed].map(name).join(' | ')}`);
      break;
    }
    if (problems.length >= 5) break;
  }
  return problems;
}

export function trialCount(fallback: number): number {
  const n = Number(process.env.CRASH_TRIALS ?? fallback);
  if (!Number.isInteger(n) || n < 1) throw new Error(`CRASH_TRIALS must be a positive integer, not ${process.env.CRASH_TRIALS}`);
  return n;
}

/** What `qemu-img check` finds wrong with an image after a crash (leaks are allowed, as for QEMU); null when nothing. */
export function qemuCheck(file: string): string | null {
  const r = spawnSync('qemu-img', ['check', '--output=json', file], { encoding: 'utf8' });
  let j: { corruptions?: number; 'check-errors'?: number } = {};
  try {
    j = JSON.parse(r.stdout) as typeof j;
  } catch {
    return `qemu-img check exit ${r.status}: ${r.stderr.trim()}`;
  }
  if ((j.corruptions ?? 0) || (j['check-errors'] ?? 0) || (r.status !== 0 && r.status !== 3)) {
    const first = r.stderr.split('\n').find((l) => /ERROR|error/.test(l)) ?? '';
    return `qemu-img check exit ${r.status}: ${j.corruptions ?? 0} corruptions, ${j['check-errors'] ?? 0} check errors ${first.trim()}`;
  }
  return null;
}
