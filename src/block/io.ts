/**
 * The block request path: the one place where alignment, splitting,
 * serialisation and fallbacks live, so drivers stay small (QEMU's block/io.c).
 *
 * Every public entry runs the same steps, each its own small function:
 *   validate at the edge (checkRequest) -> count in flight -> compute padding ->
 *   begin a tracked request (serialising when it rewrites bytes it was not
 *   given) -> wait for conflicting requests -> read-modify-write if padded ->
 *   aligned*() splits at the driver's limits and calls the driver -> end.
 * Only the aligned*() functions call driver methods; they trust their callers
 * (aligned, in range) and assert it.
 */
import assert from 'node:assert/strict';
import type { ZeroFlags } from './driver.js';
import type { BlockNode } from './node.js';
import { blockStatus, blockStatusAbove } from './block-status.js';
import { BufferPool } from './buffer-pool.js';
import { computePadding, type Padding } from './padding.js';
import { iovBytes, iovIsZero, iovSlice, isZero } from './iov.js';
import { MAX_ZERO_BOUNCE_BYTES } from './limits.js';
import type { TrackedRequest } from './tracked-requests.js';
import { VdiskError, isNotSupported } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('io');

/** Never written to: drivers must not modify the buffers they are asked to write. */
const ZERO_BOUNCE = Buffer.alloc(MAX_ZERO_BOUNCE_BYTES);

/**
 * Copy-on-read writes may trail the reads that fetched their data by this many
 * bytes per node; past that, a read waits for its own copy to land.
 */
export const COR_WRITE_BEHIND_BYTES = 32 * 1024 * 1024;
/** The trailing copies' own buffers (the caller's are free again once its read is answered). */
const corBuffers = new BufferPool(COR_WRITE_BEHIND_BYTES);

// ---------------------------------------------------------------------------
// Validation at the edge

function checkRequest(node: BlockNode, offset: number, bytes: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    throw new VdiskError('EINVAL', `bad request offset=${offset} bytes=${bytes}`);
  }
  const size = node.size();
  if (node.driver.growable) return; // a host file under a format driver: past the end reads zero, writes grow it
  if (offset > size || bytes > size - offset) {
    throw new VdiskError('EINVAL', `request offset=${offset} bytes=${bytes} is beyond the end of ${node.name} (size ${size})`);
  }
}

function checkWritable(node: BlockNode): void {
  if (node.readOnly) throw new VdiskError('EROFS', `${node.name} is read-only`);
}

function checkIov(iov: readonly Buffer[], bytes: number): void {
  if (iovBytes(iov) !== bytes) throw new VdiskError('EINVAL', `buffer list holds ${iovBytes(iov)} bytes, request is ${bytes}`);
}

// ---------------------------------------------------------------------------
// Reads

/** Read `bytes` at `offset` into `iov` (which holds exactly `bytes`). */
export async function preadv(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  checkRequest(node, offset, bytes);
  checkIov(iov, bytes);
  if (bytes === 0) return;
  if (trace.enabled) trace('preadv node=%s offset=%d bytes=%d', node.name, offset, bytes);
  node.incInFlight();
  const pad = computePadding(offset, bytes, node.limits.requestAlignment);
  const req = node.tracker.begin(pad?.offset ?? offset, pad?.bytes ?? bytes, 'read');
  let trailing: Promise<void>[] | null = null;
  try {
    if (node.copyOnRead && node.backing && !node.readOnly) {
      await copyOnReadv(node, req, offset, bytes, iov, (trailing = []));
      return;
    }
    await node.tracker.waitSerialising(req);
    await readAligned(node, offset, bytes, iov, pad);
  } finally {
    // Copies still on their way keep the request in flight, and serialising, until they land.
    if (!trailing?.length) endRequest(node, req);
    else void Promise.all(trailing).then(() => endRequest(node, req));
  }
}

function endRequest(node: BlockNode, req: TrackedRequest): void {
  node.tracker.end(req);
  node.decInFlight();
}

async function alignedPreadv(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  const { requestAlignment: align, maxTransfer } = node.limits;
  assert(offset % align === 0 && bytes % align === 0, 'alignedPreadv: unaligned request');
  if (bytes <= maxTransfer) return node.driver.preadv(offset, bytes, iov);
  for (let done = 0; done < bytes; done += maxTransfer) {
    const n = Math.min(maxTransfer, bytes - done);
    await node.driver.preadv(offset + done, n, iovSlice(iov, done, n));
  }
}

/**
 * Copy-on-read (as in QEMU's bdrv_co_do_copy_on_readv): the read is widened to whole clusters; clusters the
 * top node lacks are read through the chain, handed to the caller, and written
 * into the top node (all-zero ones as write-zeroes). The request is serialising
 * at cluster granularity and looks at the allocation only once it runs, so a
 * guest write that landed meanwhile is never overwritten.
 *
 * With `trailing`, a read does not wait for its copies: each is written from a
 * buffer of its own and its promise pushed to `trailing`, and the caller keeps
 * the request serialising until they all land (so a write to those clusters
 * still waits for them). A failed copy (disk full) only counts; the read has
 * its data. Without `trailing` (the stream job) copies are awaited and their
 * errors thrown.
 */
async function copyOnReadv(node: BlockNode, req: TrackedRequest, offset: number, bytes: number, iov: Buffer[] | null, trailing: Promise<void>[] | null): Promise<void> {
  const granularity = node.driver.allocationAlignment ?? node.limits.requestAlignment;
  const size = node.size();
  const start = offset - (offset % granularity);
  const end = Math.min(size, Math.ceil((offset + bytes) / granularity) * granularity);
  node.tracker.markSerialising(req, granularity);
  await node.tracker.waitSerialising(req);
  for (let pos = start; pos < end; ) {
    const st = await blockStatus(node, pos, end - pos);
    let n = st.bytes;
    if (st.allocated) {
      const from = Math.max(pos, offset);
      const to = Math.min(pos + n, offset + bytes);
      if (iov && to > from) await readAligned(node, from, to - from, iovSlice(iov, from - offset, to - from));
      pos += n;
      continue;
    }
    // Whole units that read as zero below need no reading at all: they become zero clusters.
    const backing = node.backing!;
    const below = pos < backing.size() ? await blockStatusAbove(backing, pos, Math.min(n, backing.size() - pos)) : null;
    const zeroUnits = below ? (below.zero ? below.bytes - (below.bytes % granularity) : 0) : n;
    if (zeroUnits > 0) n = Math.min(n, zeroUnits);
    // The caller's buffers for the part of [pos, pos+n) it asked for.
    const from = Math.max(pos, offset);
    const to = Math.min(pos + n, offset + bytes);
    const wanted = iov && to > from ? iovSlice(iov, from - offset, to - from) : [];
    const trail = trailing !== null && node.corBytesTrailing + n <= COR_WRITE_BEHIND_BYTES;
    // Reserved before reading, so that reads side by side keep to the bound together.
    if (trail) node.corBytesTrailing += n;
    let own: Buffer | null = null;
    let parts: Buffer[] = [];
    if (zeroUnits > 0) {
      for (const b of wanted) b.fill(0);
    } else if (trail) {
      own = corBuffers.take(n);
      try {
        await alignedPreadv(node, pos, n, [own]);
      } catch (err) {
        node.corBytesTrailing -= n;
        corBuffers.give(own);
        throw err;
      }
      copyInto(wanted, own.subarray(from - pos, to - pos));
      parts = [own];
      node.corStats.bytesFromBacking += n;
    } else {
      // Read straight into the caller's buffers, with scratch space around them.
      parts = wanted.length
        ? [...(from > pos ? [Buffer.allocUnsafe(from - pos)] : []), ...wanted, ...(pos + n > to ? [Buffer.allocUnsafe(pos + n - to)] : [])]
        : [Buffer.allocUnsafe(n)];
      await alignedPreadv(node, pos, n, parts);
      node.corStats.bytesFromBacking += n;
    }
    const copy = copyIn(node, pos, n, zeroUnits > 0 || iovIsZero(parts) ? null : parts, trailing === null);
    if (trail) {
      trailing.push(
        copy.finally(() => {
          node.corBytesTrailing -= n;
          if (own) corBuffers.give(own);
        }),
      );
    } else {
      await copy;
    }
    pos += n;
  }
}

/** Write one copy-on-read piece into the top node (`data` null: it reads as zero). Rejects only when `strict`. */
async function copyIn(node: BlockNode, offset: number, bytes: number, data: Buffer[] | null, strict: boolean): Promise<void> {
  try {
    if (data) await alignedPwritev(node, offset, bytes, data);
    // The clusters must be this node's afterwards, or later reads go to the backing again.
    else await alignedPwriteZeroes(node, offset, bytes, { allocate: true });
    node.corStats.bytesCopied += bytes;
  } catch (err) {
    if (strict) throw err;
    node.corStats.copyFailures++;
    trace('copy-on-read write failed node=%s offset=%d bytes=%d: %s', node.name, offset, bytes, (err as Error).message);
  }
}

/**
 * Copy [offset, offset+bytes) from the backing chain into `node` wherever it
 * lacks it (the stream job). Same serialisation as copy-on-read; errors count.
 */
export async function copyFromBacking(node: BlockNode, offset: number, bytes: number): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  if (bytes === 0 || !node.backing) return;
  node.incInFlight();
  const req = node.tracker.begin(offset, bytes, 'read');
  try {
    await copyOnReadv(node, req, offset, bytes, null, null);
  } finally {
    node.tracker.end(req);
    node.decInFlight();
  }
}

/** Read a possibly unaligned range from the driver: head and tail padding land in scratch buffers, the caller's buffers get the middle. */
async function readAligned(node: BlockNode, offset: number, bytes: number, iov: Buffer[], pad = computePadding(offset, bytes, node.limits.requestAlignment)): Promise<void> {
  if (!pad) return alignedPreadv(node, offset, bytes, iov);
  const padded = [...(pad.head ? [Buffer.allocUnsafe(pad.head)] : []), ...iov, ...(pad.tail ? [Buffer.allocUnsafe(pad.tail)] : [])];
  await alignedPreadv(node, pad.offset, pad.bytes, padded);
}

function copyInto(iov: Buffer[], src: Buffer): void {
  let pos = 0;
  for (const b of iov) {
    src.copy(b, 0, pos, pos + b.length);
    pos += b.length;
  }
}

// ---------------------------------------------------------------------------
// Writes

/** Write `bytes` from `iov` at `offset`. Unaligned edges are read-modify-written, serialised. */
export async function pwritev(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  checkIov(iov, bytes);
  if (bytes === 0) return;
  if (node.detectZeroes !== 'off' && iovIsZero(iov)) {
    if (trace.enabled) trace('pwritev detect-zeroes node=%s offset=%d bytes=%d', node.name, offset, bytes);
    return pwriteZeroes(node, offset, bytes, { mayUnmap: node.detectZeroes === 'unmap' });
  }
  if (trace.enabled) trace('pwritev node=%s offset=%d bytes=%d', node.name, offset, bytes);
  node.incInFlight();
  const align = node.limits.requestAlignment;
  const pad = computePadding(offset, bytes, align);
  const req = node.tracker.begin(pad?.offset ?? offset, pad?.bytes ?? bytes, 'write');
  try {
    // RMW rewrites bytes this request was not given: nobody may touch those blocks meanwhile.
    if (pad) node.tracker.markSerialising(req, align);
    // Allocating a cluster (and copying what the write does not cover) must not interleave either.
    await waitSerialisingAllocation(node, req, offset, bytes, false);
    if (!pad) {
      await alignedPwritev(node, offset, bytes, iov);
    } else {
      const { headBlock, tailBlock } = await rmwRead(node, pad);
      const padded = [
        ...(headBlock ? [headBlock.subarray(0, pad.head)] : []),
        ...iov,
        ...(tailBlock ? [tailBlock.subarray(align - pad.tail)] : []),
      ];
      await alignedPwritev(node, pad.offset, pad.bytes, padded);
    }
  } finally {
    node.tracker.end(req);
    node.decInFlight();
  }
}

/**
 * Wait for conflicting requests, with `req` serialising at the driver's
 * allocation granularity when it may change the mapping. Whether a write
 * allocates is only sure once the requests it waited for are done (a zero or
 * discard may have unmapped its cluster meanwhile), so it is asked again then:
 * two writes that both allocate the same cluster would leak one of them.
 */
async function waitSerialisingAllocation(node: BlockNode, req: TrackedRequest, offset: number, bytes: number, always: boolean): Promise<void> {
  const granularity = node.driver.allocationAlignment;
  const mayAllocate = () => granularity !== undefined && (always || node.driver.mayAllocate?.(offset, bytes) !== false);
  const widened = mayAllocate();
  if (widened) node.tracker.markSerialising(req, granularity!);
  await node.tracker.waitSerialising(req);
  if (!widened && mayAllocate()) {
    node.tracker.markSerialising(req, granularity!);
    await node.tracker.waitSerialising(req);
  }
}

/** Read the partially covered first and last blocks of a padded write (once if they are one block). */
async function rmwRead(node: BlockNode, pad: Padding): Promise<{ headBlock: Buffer | null; tailBlock: Buffer | null }> {
  const align = node.limits.requestAlignment;
  const lastBlock = pad.offset + pad.bytes - align;
  let headBlock: Buffer | null = null;
  let tailBlock: Buffer | null = null;
  if (pad.head) {
    if (trace.enabled) trace('rmw head node=%s offset=%d', node.name, pad.offset);
    headBlock = Buffer.allocUnsafe(align);
    await alignedPreadv(node, pad.offset, align, [headBlock]);
  }
  if (pad.tail) {
    if (headBlock && lastBlock === pad.offset) {
      tailBlock = headBlock;
    } else {
      if (trace.enabled) trace('rmw tail node=%s offset=%d', node.name, lastBlock);
      tailBlock = Buffer.allocUnsafe(align);
      await alignedPreadv(node, lastBlock, align, [tailBlock]);
    }
  }
  return { headBlock, tailBlock };
}

async function alignedPwritev(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
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

// ---------------------------------------------------------------------------
// Write-zeroes

/**
 * After this completes the range reads as zero from this node, whatever the
 * backing chain holds. With `mayUnmap` (and discard=unmap on the node) the
 * driver may also free the space.
 */
export async function pwriteZeroes(node: BlockNode, offset: number, bytes: number, flags: ZeroFlags = {}): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  if (bytes === 0) return;
  const mayUnmap = Boolean(flags.mayUnmap) && node.discard === 'unmap';
  if (trace.enabled) trace('pwriteZeroes node=%s offset=%d bytes=%d mayUnmap=%s', node.name, offset, bytes, mayUnmap);
  node.incInFlight();
  const align = node.limits.requestAlignment;
  const pad = computePadding(offset, bytes, align);
  const req = node.tracker.begin(pad?.offset ?? offset, pad?.bytes ?? bytes, 'zero');
  try {
    if (pad) node.tracker.markSerialising(req, align);
    await waitSerialisingAllocation(node, req, offset, bytes, true);
    const end = offset + bytes;
    let pos = offset;
    // A head smaller than a block: zero it inside the block by read-modify-write.
    if (pos % align !== 0) {
      const block = pos - (pos % align);
      const to = Math.min(end, block + align);
      await rmwZero(node, block, pos - block, to - block);
      pos = to;
    }
    const alignedEnd = end - (end % align);
    if (alignedEnd > pos) {
      await alignedPwriteZeroes(node, pos, alignedEnd - pos, { mayUnmap });
      pos = alignedEnd;
    }
    if (pos < end) await rmwZero(node, pos, 0, end - pos);
  } finally {
    node.tracker.end(req);
    node.decInFlight();
  }
}

async function rmwZero(node: BlockNode, block: number, from: number, to: number): Promise<void> {
  const align = node.limits.requestAlignment;
  if (trace.enabled) trace('pwriteZeroes rmw node=%s block=%d from=%d to=%d', node.name, block, from, to);
  const buf = Buffer.allocUnsafe(align);
  await alignedPreadv(node, block, align, [buf]);
  buf.fill(0, from, to);
  // A block that will read as zero anyway is a write-zeroes of the whole block:
  // the driver can do it as metadata (a qcow2 zero cluster) instead of allocating.
  if (isZero(buf)) return alignedPwriteZeroes(node, block, align, {});
  await alignedPwritev(node, block, align, [buf]);
}

/** Native write-zeroes in chunks; ENOTSUP (or no native op) falls back to writing zeroes. */
async function alignedPwriteZeroes(node: BlockNode, offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
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

// ---------------------------------------------------------------------------
// Discard

/**
 * Tell the node it may free the range. The contents afterwards are undefined:
 * callers that need zeroes use pwriteZeroes with mayUnmap. The range is rounded inward to the discard
 * alignment; discard=ignore nodes and drivers without discard do nothing.
 */
export async function pdiscard(node: BlockNode, offset: number, bytes: number): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  const drv = node.driver;
  if (bytes === 0 || node.discard === 'ignore' || !drv.pdiscard) return;
  const align = Math.max(node.limits.pdiscardAlignment, node.limits.requestAlignment);
  const start = Math.ceil(offset / align) * align;
  const end = Math.floor((offset + bytes) / align) * align;
  if (start >= end) return;
  if (trace.enabled) trace('pdiscard node=%s offset=%d bytes=%d', node.name, start, end - start);
  node.incInFlight();
  const req = node.tracker.begin(start, end - start, 'discard');
  try {
    await waitSerialisingAllocation(node, req, start, end - start, true);
    for (let pos = start; pos < end; ) {
      const n = Math.min(node.limits.maxPdiscard, end - pos);
      try {
        await drv.pdiscard(pos, n);
      } catch (err) {
        if (isNotSupported(err)) return; // discard is advisory
        throw err;
      }
      pos += n;
    }
  } finally {
    node.tracker.end(req);
    node.decInFlight();
  }
}

// ---------------------------------------------------------------------------
// Flush

/** Make every completed write durable. */
export async function flush(node: BlockNode): Promise<void> {
  if (trace.enabled) trace('flush node=%s', node.name);
  if (node.readOnly || !node.driver.flush) return;
  node.incInFlight();
  try {
    await node.driver.flush();
  } finally {
    node.decInFlight();
  }
}

