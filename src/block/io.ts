/**
 * The block request path: the entry points every caller uses, so drivers stay
 * small (QEMU's block/io.c). Each entry runs the same steps:
 *   validate at the edge (request.ts) -> begin: count in flight and track the
 *   range (serialising when it rewrites bytes it was not given) -> wait for
 *   conflicting requests -> write notifiers' `before` -> read-modify-write if
 *   padded -> the aligned adapters (aligned-io.ts) split at the driver's limits
 *   and call the driver -> notifiers' `after` -> end.
 * Copy-on-read lives in copy-on-read.ts, the write-zeroes rules in
 * write-zeroes.ts, the "past the end of a shorter backing reads zero" rule in
 * past-end.ts.
 */
import type { ZeroFlags } from './driver.js';
import type { BlockNode, WriteEvent } from './node.js';
import { copyOnReadv } from './copy-on-read.js';
import { zeroRange, zeroUnit } from './write-zeroes.js';
import { bytesInside } from './past-end.js';
import { alignedPreadv, alignedPwritev, readAligned } from './aligned-io.js';
import { beginRequest, checkIov, checkRequest, checkWritable, endRequest } from './request.js';
import { computePadding, type Padding } from './padding.js';
import { iovIsZero, iovSlice } from './iov.js';
import type { TrackedRequest } from './tracked-requests.js';
import { VdiskError, isNotSupported } from '../errors.js';
import { tracer } from '../trace.js';

export { COR_WRITE_BEHIND_BYTES } from './copy-on-read.js';

const trace = tracer('io');

// ---------------------------------------------------------------------------
// Reads

/** Read `bytes` at `offset` into `iov` (which holds exactly `bytes`). */
export async function preadv(node: BlockNode, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  checkRequest(node, offset, bytes);
  checkIov(iov, bytes);
  if (bytes === 0) return;
  if (trace.enabled) trace('preadv node=%s offset=%d bytes=%d', node.name, offset, bytes);
  const pad = computePadding(offset, bytes, node.limits.requestAlignment);
  const req = beginRequest(node, pad?.offset ?? offset, pad?.bytes ?? bytes, 'read');
  if (node.copyOnRead && node.backing && !node.readOnly) return copyOnReadRequest(node, req, offset, bytes, iov);
  try {
    await node.tracker.waitSerialising(req);
    await readAligned(node, offset, bytes, iov, pad);
  } finally {
    endRequest(node, req);
  }
}

/** A guest read with copy-on-read: answered once its data is in; copies still on their way keep the request tracked (and serialising) until they land. */
async function copyOnReadRequest(node: BlockNode, req: TrackedRequest, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  const trailing: Promise<void>[] = [];
  try {
    await copyOnReadv(node, req, offset, bytes, { iov, trailing });
  } finally {
    if (!trailing.length) endRequest(node, req);
    else void Promise.all(trailing).then(() => endRequest(node, req));
  }
}

/**
 * Read [offset, offset+bytes) of `backing` (the node below a format driver),
 * where what lies past its end, or everything without one, reads as zero.
 */
export async function readBacking(backing: BlockNode | null, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  const inside = bytesInside(backing, offset, bytes);
  if (inside > 0) await preadv(backing!, offset, inside, iovSlice(iov, 0, inside));
  if (inside < bytes) for (const b of iovSlice(iov, inside, bytes - inside)) b.fill(0);
}

/**
 * Copy [offset, offset+bytes) from the backing chain into `node` wherever it
 * lacks it (the stream job). Same serialisation as copy-on-read; errors throw.
 */
export async function copyFromBacking(node: BlockNode, offset: number, bytes: number): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  if (bytes === 0 || !node.backing) return;
  const req = beginRequest(node, offset, bytes, 'read');
  try {
    await copyOnReadv(node, req, offset, bytes, null);
  } finally {
    endRequest(node, req);
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
  const align = node.limits.requestAlignment;
  const pad = computePadding(offset, bytes, align);
  const req = beginRequest(node, pad?.offset ?? offset, pad?.bytes ?? bytes, 'write');
  // Made only when someone listens: the 4k path allocates nothing for notifiers.
  const event: WriteEvent | null = node.writeNotifiers.length ? { kind: 'write', offset, bytes } : null;
  let failed: unknown = null;
  try {
    // RMW rewrites bytes this request was not given: nobody may touch those blocks meanwhile.
    if (pad) node.tracker.markSerialising(req, align);
    // Allocating a cluster (and copying what the write does not cover) must not interleave either.
    await waitSerialisingAllocation(node, req, offset, bytes, false);
    if (event) await notifyBefore(node, event);
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
  } catch (err) {
    failed = err;
    throw err;
  } finally {
    if (event) notifyAfter(node, event, failed);
    endRequest(node, req);
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

// ---------------------------------------------------------------------------
// Write-zeroes

/**
 * After this completes the range reads as zero from this node, whatever the
 * backing chain holds. With `mayUnmap` (and discard=unmap on the node) the
 * driver may also free the space. Partial units follow write-zeroes.ts's rule.
 */
export async function pwriteZeroes(node: BlockNode, offset: number, bytes: number, flags: ZeroFlags = {}): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  if (bytes === 0) return;
  const mayUnmap = Boolean(flags.mayUnmap) && node.discard === 'unmap';
  if (trace.enabled) trace('pwriteZeroes node=%s offset=%d bytes=%d mayUnmap=%s', node.name, offset, bytes, mayUnmap);
  const unit = zeroUnit(node);
  const pad = computePadding(offset, bytes, unit);
  const req = beginRequest(node, offset, bytes, 'zero');
  const event: WriteEvent | null = node.writeNotifiers.length ? { kind: 'zero', offset, bytes } : null;
  let failed: unknown = null;
  try {
    // A partial unit is read and rewritten whole: nobody may touch that unit meanwhile.
    if (pad) node.tracker.markSerialising(req, unit);
    await waitSerialisingAllocation(node, req, offset, bytes, true);
    if (event) await notifyBefore(node, event);
    await zeroRange(node, offset, bytes, mayUnmap);
  } catch (err) {
    failed = err;
    throw err;
  } finally {
    if (event) notifyAfter(node, event, failed);
    endRequest(node, req);
  }
}

// ---------------------------------------------------------------------------
// Discard

/**
 * Does a discard on this node leave the range reading as zero? The driver
 * declares what a discarded range reads as (`discardLeaves`): zeroes, or
 * whatever is below (then only a node with no backing reads zero). Callers
 * that need zeroes (the FUSE export's hole punch) discard only when this says
 * so, with `mustZero`.
 */
export function discardLeavesZeroes(node: BlockNode): boolean {
  const drv = node.driver;
  if (node.readOnly || node.discard === 'ignore' || !drv.pdiscard) return false;
  return drv.discardLeaves === 'zero' || (drv.discardLeaves === 'unallocated' && node.backing === null);
}

export interface DiscardFlags {
  /**
   * The range must read as zero afterwards (only where discardLeavesZeroes):
   * the partial units at its edges, and any the driver declines (ENOTSUP),
   * are zeroed with write-zeroes that may unmap.
   */
  mustZero?: boolean;
}

/**
 * Tell the node it may free the range. Without `mustZero` the contents
 * afterwards are undefined. The range is rounded inward to the discard
 * alignment; discard=ignore nodes and drivers without discard do nothing.
 */
export async function pdiscard(node: BlockNode, offset: number, bytes: number, flags: DiscardFlags = {}): Promise<void> {
  checkWritable(node);
  checkRequest(node, offset, bytes);
  const mustZero = flags.mustZero === true;
  if (mustZero && !discardLeavesZeroes(node)) throw new VdiskError('EINVAL', `${node.name}: a discard there does not leave zeroes`);
  const drv = node.driver;
  if (bytes === 0 || node.discard === 'ignore' || !drv.pdiscard) return;
  const align = Math.max(node.limits.pdiscardAlignment, node.limits.requestAlignment);
  const start = Math.ceil(offset / align) * align;
  const end = Math.floor((offset + bytes) / align) * align;
  if (start >= end) {
    if (mustZero) await pwriteZeroes(node, offset, bytes, { mayUnmap: true });
    return;
  }
  if (mustZero && offset < start) await pwriteZeroes(node, offset, start - offset, { mayUnmap: true });
  const done = await discardAligned(node, start, end);
  if (mustZero && done < offset + bytes) await pwriteZeroes(node, done, offset + bytes - done, { mayUnmap: true });
}

/** Discard [start, end) (aligned) in the driver's chunks; returns where it stopped (end, or where the driver declined). */
async function discardAligned(node: BlockNode, start: number, end: number): Promise<number> {
  if (trace.enabled) trace('pdiscard node=%s offset=%d bytes=%d', node.name, start, end - start);
  const req = beginRequest(node, start, end - start, 'discard');
  const event: WriteEvent | null = node.writeNotifiers.length ? { kind: 'discard', offset: start, bytes: end - start } : null;
  let failed: unknown = null;
  let pos = start;
  try {
    await waitSerialisingAllocation(node, req, start, end - start, true);
    if (event) await notifyBefore(node, event);
    while (pos < end) {
      const n = Math.min(node.limits.maxPdiscard, end - pos);
      try {
        await node.driver.pdiscard!(pos, n);
      } catch (err) {
        if (isNotSupported(err)) break; // discard is advisory
        throw err;
      }
      pos += n;
    }
  } catch (err) {
    failed = err;
    throw err;
  } finally {
    if (event) notifyAfter(node, event, failed);
    endRequest(node, req);
  }
  return pos;
}

// ---------------------------------------------------------------------------
// Write notifiers (node.ts): called around every write, write-zeroes and
// discard that lands on the node, with the range the caller asked for.

async function notifyBefore(node: BlockNode, ev: WriteEvent): Promise<void> {
  for (const n of node.writeNotifiers) await n.before?.(ev);
}

function notifyAfter(node: BlockNode, ev: WriteEvent, error: unknown): void {
  for (const n of node.writeNotifiers) {
    try {
      n.after?.(ev, error ?? undefined);
    } catch (err) {
      trace('write notifier failed node=%s: %s', node.name, (err as Error).message);
    }
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
