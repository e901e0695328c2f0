/**
 * Hostile and broken qcow2 images: every one gives a clear error with a code,
 * never a crash, a hang or a write outside the image. The mutation fuzz run
 * opens, reads and checks 1000 seeded, reproducible variants, then writes to
 * each through a writable open, and proves that no file next to it changed.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import * as io from '../../src/block/io.js';
import { openImage } from '../../src/drivers/chain.js';
import { Qcow2Driver } from '../../src/drivers/qcow2/index.js';
import { VdiskError } from '../../src/errors.js';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean } from '../helpers/image.js';
import { sh, vdisk } from '../helpers/vdisk.js';
import { rng } from '../helpers/workload.js';

let dir: string;

useScratchDir({ fuse: false, tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

function ok(cmd: string): void {
  const r = sh(cmd);
  expect(r.status, `${cmd}\n${r.stderr}`).toBe(0);
}

/** An image with data, zero clusters, two L2 tables, made by qemu. */
function sample(name: string, opts = 'cluster_size=4k'): string {
  const image = path.join(dir, name);
  ok(`qemu-img create -q -f qcow2 -o ${opts} ${image} 8M`);
  ok(`qemu-io -c "write -P 0x5a 0 64k" -c "write -z 1M 64k" -c "write -P 0x33 6M 200k" ${image}`);
  return image;
}

function patch(image: string, edit: (b: Buffer) => void): string {
  const out = `${image}.${Math.random().toString(36).slice(2)}`;
  const b = fs.readFileSync(image);
  edit(b);
  fs.writeFileSync(out, b);
  return out;
}

/** Open, read everything, check; resolve with the error code, or 'ok'. Hangs fail via the timeout. */
async function exercise(image: string): Promise<string> {
  try {
    const node = await openImage(image, { readOnly: true, format: 'qcow2' });
    try {
      const buf = Buffer.alloc(Math.min(node.size(), 16 * 1024 * 1024));
      await io.preadv(node, 0, buf.length, [buf]);
      if (node.driver instanceof Qcow2Driver) await node.driver.check('none');
    } finally {
      await node.close();
    }
    return 'ok';
  } catch (err) {
    if (!(err instanceof VdiskError)) throw new Error(`${image}: not a VdiskError: ${(err as Error).stack}`);
    return err.code;
  }
}

/**
 * Open writable and write, zero, discard and flush a few ranges; resolve with the
 * first error code, or 'ok'. Anything but a VdiskError is a crash.
 */
async function exerciseWrites(image: string, rand: () => number): Promise<string> {
  let first = 'ok';
  const note = (err: unknown) => {
    if (!(err instanceof VdiskError)) throw new Error(`${image}: not a VdiskError: ${(err as Error).stack}`);
    if (first === 'ok') first = err.code;
  };
  let node;
  try {
    node = await openImage(image, { format: 'qcow2' });
  } catch (err) {
    note(err);
    return first;
  }
  try {
    const span = Math.min(node.size(), 16 * 1024 * 1024);
    const at = (bytes: number) => Math.floor(rand() * Math.max(1, span - bytes));
    for (let k = 0; k < 4 && span > 0; k++) {
      const bytes = Math.min(span, 512 + Math.floor(rand() * 65536));
      const data = Buffer.alloc(bytes, 0xa0 + k);
      await io.pwritev(node, at(bytes), bytes, [data]).catch(note);
    }
    if (span > 0) {
      const z = Math.min(span, 65536);
      await io.pwriteZeroes(node, at(z), z).catch(note);
      await io.pdiscard(node, at(z), z).catch(note);
    }
    await io.flush(node).catch(note);
  } finally {
    await node.close().catch(note);
  }
  return first;
}

async function within<T>(ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms (hang)`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe('broken qcow2 images', () => {
  it.each([
    ['a truncated header', (b: Buffer) => b.subarray(0, 50), 'ERR_IMAGE_CORRUPT'],
    ['version 4', (b: Buffer) => b.writeUInt32BE(4, 4), 'ERR_IMAGE_FORMAT'],
    ['cluster_bits 30', (b: Buffer) => b.writeUInt32BE(30, 20), 'ERR_IMAGE_CORRUPT'],
    ['an absurd virtual size', (b: Buffer) => b.writeBigUInt64BE(1n << 62n, 24), 'ERR_IMAGE_CORRUPT'],
    ['an absurd l1_size', (b: Buffer) => b.writeUInt32BE(0x7fffffff, 36), 'ERR_IMAGE_CORRUPT'],
    ['the L1 table outside the file', (b: Buffer) => b.writeBigUInt64BE(1n << 40n, 40), 'ERR_IMAGE_CORRUPT'],
    ['an unaligned refcount table', (b: Buffer) => b.writeBigUInt64BE(4096n + 8n, 48), 'ERR_IMAGE_CORRUPT'],
    ['a huge refcount table', (b: Buffer) => b.writeUInt32BE(1 << 30, 56), 'ERR_IMAGE_CORRUPT'],
    // Bits 56-63 of a refcount table entry belong to its offset (qemu-img: "outside image"), unlike an L2 entry's flags.
    ['a refcount table entry with a high offset bit', (b: Buffer) => b.writeUInt8(b.readUInt8(Number(b.readBigUInt64BE(48))) | 1, Number(b.readBigUInt64BE(48))), 'ERR_IMAGE_CORRUPT'],
    ['refcount_order 7', (b: Buffer) => b.writeUInt32BE(7, 96), 'ERR_IMAGE_CORRUPT'],
    ['unknown incompatible features', (b: Buffer) => b.writeBigUInt64BE(1n << 40n, 72), 'ERR_IMAGE_FORMAT'],
    ['an external data file', (b: Buffer) => b.writeBigUInt64BE(4n, 72), 'ERR_IMAGE_FORMAT'],
    ['encryption', (b: Buffer) => b.writeUInt32BE(1, 32), 'ERR_IMAGE_FORMAT'],
  ] as Array<[string, (b: Buffer) => Buffer | void, string]>)('%s: %s', async (_what, edit, code) => {
    const base = sample(`h-${code}-${Math.random()}.qcow2`);
    const bad = path.join(dir, `bad-${Math.random()}.qcow2`);
    const b = fs.readFileSync(base);
    const out = edit(b);
    fs.writeFileSync(bad, out instanceof Buffer ? out : b);
    expect(await within(10_000, exercise(bad), bad)).toBe(code);
    const cli = vdisk(['info', bad]);
    expect(cli.status).toBe(1);
    expect(cli.stderr).toMatch(new RegExp(`^vdisk: error ${code}: `));
  });

  it('L2 entries pointing outside the file, into metadata, or unaligned are errors on read', async () => {
    const base = sample('l2.qcow2');
    const b = fs.readFileSync(base);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const cases: Array<[string, bigint]> = [
      ['outside', (1n << 63n) | (1n << 45n)],
      ['into the L1 table', (1n << 63n) | BigInt(l1)],
      ['unaligned', (1n << 63n) | BigInt(l2 + 512 * 3)],
    ];
    for (const [what, entry] of cases) {
      const bad = patch(base, (x) => x.writeBigUInt64BE(entry, l2));
      expect(await within(10_000, exercise(bad), what), what).toBe('ERR_IMAGE_CORRUPT');
    }
  });

  it('vdisk check finds leaks and corruption, and -r all repairs them so that qemu-img check is clean', async () => {
    const base = sample('leak.qcow2');
    const b = fs.readFileSync(base);
    const reftable = Number(b.readBigUInt64BE(48));
    const block = Number(b.readBigUInt64BE(reftable));
    // Cluster 100 leaked (refcount 1, nothing uses it); cluster 0 (the header) with refcount 0.
    const bad = patch(base, (x) => {
      x.writeUInt16BE(1, block + 100 * 2);
      x.writeUInt16BE(0, block);
    });
    fs.truncateSync(bad, Math.max(fs.statSync(bad).size, 101 * 4096));
    const c = vdisk(['check', '--output', 'json', bad]);
    expect(c.status).toBe(2);
    const j = JSON.parse(c.stdout) as { corruptions: number; leaks: number };
    expect(j.leaks).toBeGreaterThanOrEqual(1);
    expect(j.corruptions).toBeGreaterThanOrEqual(1);
    const leaksOnly = vdisk(['check', '-r', 'leaks', bad]);
    expect(leaksOnly.status).toBe(2); // the corruption is still there
    const fix = vdisk(['check', '-r', 'all', bad]);
    expect(fix.status, fix.stdout).toBe(0);
    expectQemuClean(bad);
  });

  it('mutation fuzzing: 1000 seeded variants open, read, check, then take writes, with an answer, never a crash, a hang or a write outside the image', async () => {
    // Its own directory: the seeds, a raw backing file one seed names, and a neighbour
    // file. Nothing but the fuzzed image may change, whatever its metadata says.
    const fz = fs.mkdtempSync(path.join(dir, 'fuzz-'));
    const backing = path.join(fz, 'backing.raw');
    fs.writeFileSync(backing, Buffer.alloc(8 * 1024 * 1024, 0x42));
    fs.writeFileSync(path.join(fz, 'neighbour.bin'), Buffer.alloc(65536, 0x17));
    const seeds = [
      sample(path.relative(dir, path.join(fz, 'fz-4k.qcow2'))),
      sample(path.relative(dir, path.join(fz, 'fz-ext.qcow2')), 'cluster_size=16k,extended_l2=on'),
      sample(path.relative(dir, path.join(fz, 'fz-v2.qcow2')), 'compat=0.10,cluster_size=512'),
      sample(path.relative(dir, path.join(fz, 'fz-backed.qcow2')), 'cluster_size=4k,backing_file=backing.raw,backing_fmt=raw'),
    ];
    const scratch = path.join(fz, 'fuzz.qcow2');
    const snapshot = () => fs.readdirSync(fz).filter((f) => f !== 'fuzz.qcow2').sort().map((f) => {
      const st = fs.statSync(path.join(fz, f), { bigint: true });
      return `${f} ${st.size} ${st.mtimeNs} ${st.ctimeNs}`;
    });
    const digest = () => fs.readdirSync(fz).filter((f) => f !== 'fuzz.qcow2').sort().map((f) => `${f} ${createHash('sha256').update(fs.readFileSync(path.join(fz, f))).digest('hex')}`);
    const around = snapshot();
    const aroundDigest = digest();
    const codes = new Map<string, number>();
    const writeCodes = new Map<string, number>();
    let grew = 0;
    let maxGrowth = 0;
    for (let i = 0; i < 1000; i++) {
      const rand = rng(0xf00d + i);
      const src = fs.readFileSync(seeds[i % seeds.length]!);
      const b = Buffer.from(src);
      const cs = 2 ** b.readUInt32BE(20);
      // Mutate metadata: mostly the header cluster and the tables after it.
      const hot = Math.min(b.length, cs * 8);
      const n = 1 + Math.floor(rand() * 8);
      for (let k = 0; k < n; k++) {
        const at = rand() < 0.8 ? Math.floor(rand() * hot) : Math.floor(rand() * b.length);
        const r = rand();
        if (r < 0.5) b[at] = Math.floor(rand() * 256);
        else if (r < 0.8) b[at] ^= 1 << Math.floor(rand() * 8);
        else if (at + 8 <= b.length) b.writeBigUInt64BE(BigInt(Math.floor(rand() * 2 ** 32)) << BigInt(Math.floor(rand() * 30)), at - (at % 8));
      }
      const cut = rand() < 0.05 ? Math.floor(rand() * b.length) : b.length;
      fs.writeFileSync(scratch, b.subarray(0, cut));
      const code = await within(10_000, exercise(scratch), `fuzz case ${i}`);
      codes.set(code, (codes.get(code) ?? 0) + 1);
      const wrote = await within(10_000, exerciseWrites(scratch, rng(0xbeef + i)), `fuzz case ${i} (writes)`);
      writeCodes.set(wrote, (writeCodes.get(wrote) ?? 0) + 1);
      if (fs.statSync(scratch).size > cut) grew++;
      // A hostile table pointer must not send a write far past the file's end (a huge sparse file).
      maxGrowth = Math.max(maxGrowth, fs.statSync(scratch).size - cut);
      expect(fs.statSync(scratch).size - cut, `fuzz case ${i}: the image grew by more than was written`).toBeLessThan(64 * 1024 * 1024);
      expect(snapshot(), `fuzz case ${i} changed a file next to the image`).toEqual(around);
    }
    console.log('fuzz outcomes', Object.fromEntries(codes), 'with writes', Object.fromEntries(writeCodes), 'images grown by writes', grew, 'most growth', maxGrowth);
    expect(digest()).toEqual(aroundDigest);
    expect(fs.readdirSync(fz).sort()).toEqual([...around.map((l) => l.split(' ')[0]!), 'fuzz.qcow2'].sort());
    // Both outcomes occur: some mutations are harmless, many are caught; and the writes
    // really reached some of the hostile images (they are not all refused at open).
    expect(codes.get('ok') ?? 0).toBeGreaterThan(0);
    expect(codes.get('ERR_IMAGE_CORRUPT') ?? 0).toBeGreaterThan(0);
    expect(writeCodes.get('ok') ?? 0).toBeGreaterThan(0);
    expect(grew).toBeGreaterThan(0);
  }, 600_000); // 2000 opens: about 30 s alone, several times that on a loaded machine
});
