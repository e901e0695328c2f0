/**
 * Copy-on-read (as in QEMU's bdrv_co_do_copy_on_readv): the range is widened
 * to whole clusters; clusters the top node lacks are read through the chain,
 * handed to the caller, and written into the top node (all-zero ones as
 * write-zeroes). The request is serialising at cluster granularity and looks
 * at the allocation only once it runs, so a guest write that landed meanwhile
 * is never overwritten.
 *
 * One buffer strategy: every piece read through the chain lands in a buffer
 * of its own from a pool, the caller's part is copied out of it, and the
 * buffer goes back to the pool once its copy has landed. So the caller's
 * buffers are free as soon as its read is answered, and a guest read does not
 * wait for its copies while they stay within COR_WRITE_BEHIND_BYTES per node
 * (past that it waits, which bounds the memory). The caller keeps the request
 * tracked and serialising until the copies pushed to `trailing` land, so a
 * write to those clusters still waits for them. A failed trailing copy (disk
 * full) only counts: the read has its data. The stream job copies with no
 * caller buffers, awaits every copy and gets its errors.
 */
import type { BlockNode } from './node.js';
import type { TrackedRequest } from './tracked-requests.js';
import { blockStatus, blockStatusBelow } from './block-status.js';
import { BufferPool } from './buffer-pool.js';
import { alignedPreadv, alignedPwriteZeroes, alignedPwritev, readAligned } from './aligned-io.js';
import { isZero, iovCopyFrom, iovSlice } from './iov.js';
import { tracer } from '../trace.js';

const trace = tracer('io');

/**
 * Copy-on-read writes may trail the reads that fetched their data by this many
 * bytes per node; past that, a read waits for its own copy to land.
 */
export const COR_WRITE_BEHIND_BYTES = 32 * 1024 * 1024;
/** The copies' buffers, reused: a fresh one per piece costs page faults and GC work. */
const corBuffers = new BufferPool(COR_WRITE_BEHIND_BYTES);

/** A guest read: its buffers get [offset, offset+iovBytes); copies may trail, failures only count. */
export interface CopyForRead {
  readonly iov: Buffer[];
  /** Promises of copies still landing after the read returns (the caller ends the request when they settle). */
  readonly trailing: Promise<void>[];
}

/**
 * Copy [offset, offset+bytes) of `node` in from its backing chain wherever the
 * node lacks it. With `read`, the caller's buffers receive that range's data;
 * without (the stream job), every copy is awaited and its error thrown.
 */
export async function copyOnReadv(node: BlockNode, req: TrackedRequest, offset: number, bytes: number, read: CopyForRead | null): Promise<void> {
  const granularity = node.driver.allocationAlignment ?? node.limits.requestAlignment;
  const start = offset - (offset % granularity);
  const end = Math.min(node.size(), Math.ceil((offset + bytes) / granularity) * granularity);
  node.tracker.markSerialising(req, granularity);
  await node.tracker.waitSerialising(req);
  for (let pos = start; pos < end; ) {
    const st = await blockStatus(node, pos, end - pos);
    // The caller's part of [pos, pos+n).
    let n = st.bytes;
    if (st.allocated) {
      const from = Math.max(pos, offset);
      const to = Math.min(pos + n, offset + bytes);
      if (read && to > from) await readAligned(node, from, to - from, iovSlice(read.iov, from - offset, to - from));
      pos += n;
      continue;
    }
    // Whole units that read as zero below need no reading at all: they become zero clusters.
    const below = await blockStatusBelow(node, pos, n);
    const zeroUnits = below.zero ? below.bytes - (below.bytes % granularity) : 0;
    if (zeroUnits > 0) n = Math.min(n, zeroUnits);
    const from = Math.max(pos, offset);
    const to = Math.min(pos + n, offset + bytes);
    const wanted = read && to > from ? iovSlice(read.iov, from - offset, to - from) : null;
    const trail = read !== null && node.corBytesTrailing + n <= COR_WRITE_BEHIND_BYTES;
    // Reserved before reading, so that reads side by side keep to the bound together.
    if (trail) node.corBytesTrailing += n;
    let own: Buffer | null = null;
    if (zeroUnits > 0) {
      if (wanted) for (const b of wanted) b.fill(0);
    } else {
      own = corBuffers.take(n);
      try {
        await alignedPreadv(node, pos, n, [own]);
      } catch (err) {
        if (trail) node.corBytesTrailing -= n;
        corBuffers.give(own);
        throw err;
      }
      if (wanted) iovCopyFrom(wanted, own.subarray(from - pos, to - pos));
      node.corStats.bytesFromBacking += n;
    }
    const data = own && !isZero(own) ? own : null;
    const copy = copyIn(node, pos, n, data, read === null);
    const landed = copy.finally(() => {
      if (trail) node.corBytesTrailing -= n;
      if (own) corBuffers.give(own);
    });
    if (trail) read.trailing.push(landed);
    else await landed;
    pos += n;
  }
}

/** Write one copy-on-read piece into the top node (`data` null: it reads as zero). Rejects only when `strict`. */
async function copyIn(node: BlockNode, offset: number, bytes: number, data: Buffer | null, strict: boolean): Promise<void> {
  try {
    if (data) await alignedPwritev(node, offset, bytes, [data]);
    // The clusters must be this node's afterwards, or later reads go to the backing again.
    else await alignedPwriteZeroes(node, offset, bytes, { allocate: true });
    node.corStats.bytesCopied += bytes;
  } catch (err) {
    if (strict) throw err;
    node.corStats.copyFailures++;
    trace('copy-on-read write failed node=%s offset=%d bytes=%d: %s', node.name, offset, bytes, (err as Error).message);
  }
}
