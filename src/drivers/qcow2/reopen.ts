/**
 * Reopening an open image read-write and back (graph.ts reopen: a commit job
 * writes into a backing node that was opened read-only).
 *
 * Read-write: the host file is reopened with the writer's lock first, so no
 * other writer can change the image under what is read next; then the image
 * is opened afresh on it (what it held while read-only may be stale: another
 * process could write it meanwhile) and made ready for writing exactly as a
 * writable open does (autoclear bits cleared, persistent bitmaps dropped,
 * refcounts rebuilt after a lazy-refcounts crash). A corrupt image stays
 * read-only. Any failure gives the lock back and leaves the old state in place.
 *
 * Read-only: new writes are refused, the ones in flight finish, everything is
 * flushed in flush.ts's order, then the host file is reopened read-only (which
 * drops the lock) and the state is marked read-only.
 */
import { reopen } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { VdiskError, type ErrorCode } from '../../errors.js';
import { tracer } from '../../trace.js';
import { INCOMPAT_CORRUPT, INCOMPAT_EXTL2 } from './header.js';
import { flush, flushCorrupt } from './flush.js';
import type { Qcow2State } from './state.js';

const trace = tracer('qcow2');

/** One clear error for a reopen that failed, keeping the cause's code (EBUSY: another writer holds the lock). */
function reopenError(file: BlockNode, readOnly: boolean, err: unknown): VdiskError {
  const code: ErrorCode = err instanceof VdiskError ? err.code : 'EIO';
  const why = err instanceof VdiskError ? err.message : (err as Error).message;
  return new VdiskError(code, `qcow2 ${file.name}: cannot be reopened ${readOnly ? 'read-only' : 'read-write'}: ${why}`, { cause: err });
}

/** The geometry the node's limits and size were made from: a fresh state must keep it. */
function sameGeometry(a: Qcow2State, b: Qcow2State): boolean {
  const extl2 = (s: Qcow2State): boolean => (s.header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  return a.header.size === b.header.size && a.clusterBits === b.clusterBits && extl2(a) === extl2(b);
}

/**
 * Returns the writable state that replaces `old`. `load` reads the image
 * read-only into a new state (index.ts openState); `prepare` is a writable
 * open's preparation (index.ts prepareForWriting).
 */
export async function reopenWritable(
  old: Qcow2State,
  load: (file: BlockNode) => Promise<Qcow2State>,
  prepare: (s: Qcow2State) => Promise<void>,
): Promise<Qcow2State> {
  const file = old.file;
  try {
    await reopen(file, false);
  } catch (err) {
    throw reopenError(file, false, err);
  }
  try {
    const fresh = await load(file);
    // Reads through the backing node (a repair's, a copy's) find it from the start.
    fresh.node = old.node;
    if (!sameGeometry(old, fresh)) throw new VdiskError('EIO', 'the image changed on disk while it was open read-only');
    if (fresh.header.incompatibleFeatures & INCOMPAT_CORRUPT) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', 'the image is marked corrupt, writes are refused (vdisk check -r all repairs it)');
    }
    if (fresh.corruptReason) throw new VdiskError('ERR_IMAGE_CORRUPT', `the image is corrupt (${fresh.corruptReason}), writes are refused`);
    const before = fresh.warnings.length;
    fresh.ro = false;
    await prepare(fresh);
    if (fresh.corruptReason) throw new VdiskError('ERR_IMAGE_CORRUPT', `the image is corrupt (${fresh.corruptReason}), writes are refused`);
    for (const w of fresh.warnings.slice(before)) trace('reopen %s: %s', file.name, w);
    fresh.warnings.unshift(...old.warnings);
    return fresh;
  } catch (err) {
    // Back to what it was: the lock given up, the old (read-only) state kept.
    await reopen(file, true).catch((again: unknown) => trace('reopen %s: giving the lock back failed: %s', file.name, (again as Error).message));
    throw reopenError(file, false, err);
  }
}

/** Flush everything, give up the writer's lock, refuse writes from then on. */
export async function reopenReadOnly(s: Qcow2State): Promise<void> {
  // From here a new write is refused; those in flight (started after graph.ts
  // drained the node) finish before the flush, so none is left unwritten.
  s.writesStopped = true;
  try {
    await s.node?.drain();
    if (s.corruptReason) await flushCorrupt(s);
    else await flush(s);
    await reopen(s.file, true);
  } catch (err) {
    throw reopenError(s.file, true, err);
  } finally {
    s.writesStopped = false;
  }
  s.ro = true;
}
