/**
 * The aligned adapters: the only functions that call driver read, write and
 * write-zeroes methods. They trust their callers (aligned, in range), assert
 * it, and split at the driver's limits. io.ts, copy-on-read.ts and
 * write-zeroes.ts build on them.
 */
import assert from 'node:assert/strict';
import type { ZeroFlags } from './driver.js';
import type { BlockNode } from './node.js';
import { computePadding } from './padding.js';
import { iovSlice } from './iov.js';
import { MAX_ZERO_BOUNCE_BYTES } from './limits.js';
import { VdiskError, isNotSupported } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('io');

/** Never written to: drivers must not modify the buffers they are asked to write. */
const ZERO_BOUNCE = Buffer.alloc(MAX_ZERO_BOUNCE_BYTES);

export async function alignedPreadv(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  const { requestAlignment: align, maxTransfer } = node.limits;
  assert(offset % align === 0 && bytes % align === 0, 'alignedPreadv: unaligned request');
  if (bytes <= maxTransfer) return node.driver.preadv(offset, bytes, iov);
  for (let done = 0; done < bytes; done += maxTransfer) {
    const n = Math.min(maxTransfer, bytes - done);
    await node.driver.preadv(offset + done, n, iovSlice(iov, done, n));
  }
}

/** Read a possibly unaligned range from the driver: head and tail padding land in scratch buffers, the caller's buffers get the middle. */
export async function readAligned(node: BlockNode, offset: number, bytes: number, iov: Buffer[], pad = computePadding(offset, bytes, node.limits.requestAlignment)): Promise<void> {
  if (!pad) return alignedPreadv(node, offset, bytes, iov);
  const padded = [...(pad.head ? [Buffer.allocUnsafe(pad.head)] : []), ...iov, ...(pad.tail ? [Buffer.allocUnsafe(pad.tail)] : [])];
  await alignedPreadv(node, pad.offset, pad.bytes, padded);
}

export async function alignedPwritev(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  const { requestAlignment: align, maxTransfer } = node.limits;
  assert(offset % align === 0 && bytes % align === 0, 'alignedPwritev: unaligned request');
  const drv = node.driver;
  if (!drv.pwritev) throw new VdiskError('EROFS', `${node.name} (${drv.formatName}) cannot be written`);
  if (bytes <= maxTransfer) return drv.pwritev(offset, bytes, iov);
  for (let done = 0; done < bytes; done += maxTransfer) {
    const n = Math.min(maxTransfer, bytes - done);
    await drv.pwritev(offset + done, n, iovSlice(iov, done, n));
  }
}

/** Native write-zeroes in chunks; ENOTSUP (or no native op) falls back to writing zeroes. */
export async function alignedPwriteZeroes(node: BlockNode, offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
  const { requestAlignment: align, maxPwriteZeroes } = node.limits;
  assert(offset % align === 0 && bytes % align === 0, 'alignedPwriteZeroes: unaligned request');
  const drv = node.driver;
  let done = 0;
  if (drv.pwriteZeroes) {
    try {
      while (done < bytes) {
        const n = Math.min(maxPwriteZeroes, bytes - done);
        await drv.pwriteZeroes(offset + done, n, flags);
        done += n;
      }
      return;
    } catch (err) {
      if (!isNotSupported(err)) throw err;
      if (trace.enabled) trace('pwriteZeroes fallback node=%s offset=%d bytes=%d', node.name, offset + done, bytes - done);
    }
  }
  await writeZeroesFallback(node, offset + done, bytes - done);
}

/**
 * Write real zeroes from one bounded buffer, reused for every chunk, so zeroing
 * a terabyte takes constant memory, not a terabyte of zeroes.
 */
async function writeZeroesFallback(node: BlockNode, offset: number, bytes: number): Promise<void> {
  const { requestAlignment: align, maxTransfer } = node.limits;
  let chunk = Math.min(maxTransfer, MAX_ZERO_BOUNCE_BYTES);
  chunk -= chunk % align;
  const zero = chunk >= align ? ZERO_BOUNCE.subarray(0, chunk) : Buffer.alloc((chunk = align));
  for (let done = 0; done < bytes; ) {
    const n = Math.min(chunk, bytes - done);
    await alignedPwritev(node, offset + done, n, [n === zero.length ? zero : zero.subarray(0, n)]);
    done += n;
  }
}
