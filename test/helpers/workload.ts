/**
 * A seeded random workload of writes, zero ranges and punched holes, applied
 * to a target file and to a model raw file alike. Used through real mounts:
 * the syscalls (pwrite, fallocate) go through FUSE to vdisk.
 */
import fs from 'node:fs';
import { native, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../../src/native.js';

/** xorshift32: reproducible from the seed printed with any failure. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** `bytes` of reproducible pseudo-random data (a multiple of 4). */
export function seededData(bytes: number, seed: number): Buffer {
  const data = Buffer.alloc(bytes);
  const rand = rng(seed);
  for (let i = 0; i < bytes; i += 4) data.writeUInt32LE((rand() * 2 ** 32) >>> 0, i);
  return data;
}

export interface WorkloadOptions {
  seed: number;
  size: number;
  ops: number;
  /** Largest request; offsets and lengths are random, unaligned ones included. */
  maxBytes: number;
}

export async function runWorkload(target: string, model: string, o: WorkloadOptions): Promise<void> {
  const rand = rng(o.seed);
  const t = fs.openSync(target, 'r+');
  const m = fs.openSync(model, 'r+');
  try {
    for (let i = 0; i < o.ops; i++) {
      const r = rand();
      const aligned = rand() < 0.5;
      let bytes = 1 + Math.floor(rand() * o.maxBytes);
      let offset = Math.floor(rand() * (o.size - 1));
      if (aligned) {
        offset -= offset % 4096;
        bytes = Math.max(4096, bytes - (bytes % 4096));
      }
      bytes = Math.min(bytes, o.size - offset);
      if (r < 0.6) {
        const data = Buffer.alloc(bytes);
        for (let k = 0; k + 4 <= bytes; k += 4096) data.writeUInt32LE((o.seed * 7919 + i * 104729 + k) >>> 0, k);
        data.fill(i & 0xff, 4, Math.min(bytes, 64));
        fs.writeSync(t, data, 0, bytes, offset);
        fs.writeSync(m, data, 0, bytes, offset);
      } else {
        const mode = r < 0.8 ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        await native().fallocate(t, mode, offset, bytes);
        await native().fallocate(m, mode, offset, bytes);
      }
      if (rand() < 0.1) {
        // Read back a random range now and then: it must already match the model.
        const ro = Math.floor(rand() * (o.size - 1));
        const rb = Math.min(o.size - ro, 1 + Math.floor(rand() * o.maxBytes));
        const a = Buffer.alloc(rb);
        const b = Buffer.alloc(rb);
        fs.readSync(t, a, 0, rb, ro);
        fs.readSync(m, b, 0, rb, ro);
        if (!a.equals(b)) throw new Error(`seed ${o.seed} op ${i}: read of ${rb} bytes at ${ro} differs from the model`);
      }
    }
    fs.fsyncSync(t);
  } finally {
    fs.closeSync(t);
    fs.closeSync(m);
  }
}
