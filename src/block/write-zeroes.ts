/**
 * Write-zeroes on a range that is tracked and serialised already (io.ts
 * pwriteZeroes): the aligned middle goes to the driver's write-zeroes, the
 * partial units at the edges follow one rule, for every format.
 *
 * The unit is the driver's `pwriteZeroesAlignment` (qcow2: its cluster or
 * subcluster; other drivers: the request alignment). A partial unit becomes a
 * whole-unit write-zeroes (a qcow2 zero cluster, no allocation) only if the
 * rest of it already reads as zero through the whole chain; otherwise its
 * zeroes are written as data, in request-aligned blocks, and the rest of the
 * unit keeps its contents. A unit cut short by the end of the node is whole.
 */
import type { BlockNode } from './node.js';
import { alignedPreadv, alignedPwriteZeroes, alignedPwritev } from './aligned-io.js';
import { isZero } from './iov.js';
import { tracer } from '../trace.js';

const trace = tracer('io');

/** The unit partial write-zeroes are widened to (a multiple of the request alignment). */
export function zeroUnit(node: BlockNode): number {
  return Math.max(node.limits.pwriteZeroesAlignment, node.limits.requestAlignment);
}

export async function zeroRange(node: BlockNode, offset: number, bytes: number, mayUnmap: boolean): Promise<void> {
  const unit = zeroUnit(node);
  const end = offset + bytes;
  const size = node.size();
  let pos = offset;
  if (pos % unit !== 0) {
    const unitStart = pos - (pos % unit);
    const to = Math.min(end, unitStart + unit);
    await zeroInUnit(node, unitStart, pos, to, mayUnmap);
    pos = to;
  }
  // The last unit may end at the end of the node rather than on a unit boundary.
  const alignedEnd = end === size ? end : end - (end % unit);
  if (alignedEnd > pos) {
    await alignedPwriteZeroes(node, pos, alignedEnd - pos, { mayUnmap });
    pos = alignedEnd;
  }
  if (pos < end) await zeroInUnit(node, pos, pos, end, mayUnmap);
}

/** Zero [from, to) inside the unit starting at `unitStart`, by the rule above. */
async function zeroInUnit(node: BlockNode, unitStart: number, from: number, to: number, mayUnmap: boolean): Promise<void> {
  const unitEnd = Math.min(unitStart + zeroUnit(node), node.size());
  if (from === unitStart && to === unitEnd) return alignedPwriteZeroes(node, unitStart, unitEnd - unitStart, { mayUnmap });
  if (trace.enabled) trace('pwriteZeroes partial unit node=%s unit=%d from=%d to=%d', node.name, unitStart, from, to);
  const buf = Buffer.allocUnsafe(unitEnd - unitStart);
  await alignedPreadv(node, unitStart, buf.length, [buf]);
  buf.fill(0, from - unitStart, to - unitStart);
  if (isZero(buf)) return alignedPwriteZeroes(node, unitStart, buf.length, { mayUnmap });
  // Zeroes as data, in whole request-aligned blocks (their other bytes as read).
  const align = node.limits.requestAlignment;
  const a = from - (from % align);
  const b = Math.min(unitEnd, Math.ceil(to / align) * align);
  await alignedPwritev(node, a, b - a, [buf.subarray(a - unitStart, b - unitStart)]);
}
