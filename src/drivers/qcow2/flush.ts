/**
 * Flush: the ordered write-out of metadata that memory holds.
 *
 * Update order, for crash safety (as QEMU keeps it; each arrow that says
 * flush is a host flush, because the host may reorder writes between flushes):
 *   data, refcount blocks          ->  flush
 *   L2 tables (new ones included)  ->  flush  (only when L1 changed too)
 *   L1 table                       ->  flush
 *   -> only then are freed clusters' refcounts dropped, flushed, and their space punched.
 * So an on-disk L2 entry never points at data or refcounts that are not on
 * disk, and an on-disk L1 entry never names an L2 table that is not: a new
 * table (possibly in a reused cluster, which holds stale bytes until it is
 * written) or the copy of a table shared with a snapshot. Allocating writes
 * only touch memory metadata after their data write has completed, and tables
 * reach the disk only in flush() (the caches never write out a dirty table on
 * eviction: too many dirty tables make the driver flush). Refcount blocks and
 * the refcount table keep their own order (refcount.ts), and the header is
 * rewritten only after what it names is flushed (writeHeader's callers).
 */
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import type { Qcow2State } from './state.js';

const trace = tracer('qcow2');

/** The ordered metadata write-out described at the top of this file. */
export async function flush(s: Qcow2State): Promise<void> {
  if (s.ro) return;
  if (s.corruptReason) return flushCorrupt(s);
  await s.metaLock.run(async () => {
    // Refcounts (of new data clusters and of new L2 tables) and the data are
    // stable before any table that uses them is written.
    await s.refcounts.writeDirty();
    await io.flush(s.file);
    const l2Written = await s.l2Cache.writeDirty();
    let l1Written = false;
    if (s.l1Dirty) {
      // The L2 tables an L1 entry may name for the first time are stable before
      // it: without this flush the host may write L1 first, and a power cut
      // leaves L1 naming a cluster past the end of the file or one with stale bytes.
      if (l2Written) await io.flush(s.file);
      s.l1Dirty = false;
      await io.pwritev(s.file, s.header.l1TableOffset, s.l1.length, [Buffer.from(s.l1)]);
      l1Written = true;
    }
    // Stable before flush() returns, and before frees drop what the old tables used.
    if (l2Written || l1Written || s.refcounts.hasPendingFrees) await io.flush(s.file);
    if (s.refcounts.hasPendingFrees) await releaseFreed(s);
  });
}

/** Apply held-back frees, give their space back to the host, shrink the file if its end is free. */
async function releaseFreed(s: Qcow2State): Promise<void> {
  const freed = await s.refcounts.applyFrees();
  for (const off of freed) {
    s.metadataRanges.remove(off, s.clusterSize);
    s.l2Cache.drop(off);
  }
  await s.refcounts.writeDirty();
  await io.flush(s.file);
  for (const off of freed) {
    try {
      await io.pdiscard(s.file, off, Math.min(s.clusterSize, Math.max(0, s.file.size() - off)));
    } catch {
      // Returning space is best effort.
    }
  }
  const usedEnd = await s.refcounts.usedEnd();
  if (usedEnd < s.file.size() && s.file.driver.truncate) {
    await s.file.truncate(usedEnd);
    s.refcounts.truncated(usedEnd);
    trace('file shrunk to %d', usedEnd);
  }
}

/**
 * A corrupt image gets no more metadata writes (they could land in aliased
 * tables): a flush succeeds only if nothing is left unwritten.
 */
export async function flushCorrupt(s: Qcow2State): Promise<void> {
  await s.corruptBitWrite;
  if (s.l1Dirty || s.l2Cache.hasDirty || s.refcounts.hasUnwritten) {
    throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: the image is corrupt (${s.corruptReason}): metadata changes are not written`);
  }
  await io.flush(s.file);
}

/** Bounded memory: too many dirty tables means a flush now. */
export async function flushIfCacheFull(s: Qcow2State): Promise<void> {
  if (s.l2Cache.wantsFlush || s.refcounts.cacheWantsFlush) await flush(s);
}
