/**
 * Block status: what a range of a node is (allocated here? reads as zero? data?),
 * and "above" a chain: the first node from the top that defines the range.
 * Feeds SEEK_DATA/SEEK_HOLE, `vdisk map`, and later copy-on-read and stream.
 */
import type { BlockNode } from './node.js';
import { bytesInside } from './past-end.js';
import { VdiskError } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('io');

export interface BlockStatus {
  /** Length of the prefix of the asked range this answer covers; > 0. */
  bytes: number;
  /** Some node of the chain (above `base`) defines this range. */
  allocated: boolean;
  /** The range reads as zero. */
  zero: boolean;
  /** Data lives in storage for this range (as opposed to a hole or a zero flag). */
  data: boolean;
  /** The node that defines the range; null when nothing in the chain does (reads zero). */
  node: BlockNode | null;
  /** Offset in that node's host storage, where meaningful. */
  hostOffset?: number;
}

/** Status of a prefix of [offset, offset+bytes) in this node alone. Requires offset < size. */
export async function blockStatus(node: BlockNode, offset: number, bytes: number): Promise<BlockStatus> {
  const size = node.size();
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || offset >= size || bytes <= 0) {
    throw new VdiskError('EINVAL', `block status offset=${offset} bytes=${bytes} outside ${node.name} (size ${size})`);
  }
  bytes = Math.min(bytes, size - offset);
  const drv = node.driver;
  if (!drv.blockStatus) return { bytes, allocated: true, zero: false, data: true, node };
  // The driver sees aligned requests only; widen, ask, then trim back to what was asked.
  const align = node.limits.requestAlignment;
  const alignedOffset = offset - (offset % align);
  const alignedEnd = Math.min(size, Math.ceil((offset + bytes) / align) * align);
  node.incInFlight();
  try {
    const st = await drv.blockStatus(alignedOffset, alignedEnd - alignedOffset);
    if (!(st.bytes > 0) || st.bytes > alignedEnd - alignedOffset) {
      throw new VdiskError('EIO', `${node.name}: driver answered block status with ${st.bytes} bytes`);
    }
    const end = Math.min(alignedOffset + st.bytes, offset + bytes);
    const out: BlockStatus = { bytes: end - offset, allocated: st.allocated, zero: st.zero, data: st.data, node };
    if (st.hostOffset !== undefined) out.hostOffset = st.hostOffset + (offset - alignedOffset);
    if (trace.enabled) trace('blockStatus node=%s offset=%d bytes=%d allocated=%s zero=%s data=%s', node.name, offset, out.bytes, out.allocated, out.zero, out.data);
    return out;
  } finally {
    node.decInFlight();
  }
}

/**
 * Status above the chain from `top` down to (not including) `base`: the first
 * node that defines the range answers. A range nothing defines reads as zero.
 */
export async function blockStatusAbove(top: BlockNode, offset: number, bytes: number, base: BlockNode | null = null): Promise<BlockStatus> {
  const st = await blockStatus(top, offset, bytes);
  return st.allocated ? st : blockStatusBelow(top, offset, st.bytes, base);
}

/**
 * What shows through where `node` defines nothing: the status of its backing
 * chain down to (not including) `base`. Past the end of a shorter backing node
 * the range reads as zero (past-end.ts).
 */
export async function blockStatusBelow(node: BlockNode, offset: number, bytes: number, base: BlockNode | null = null): Promise<BlockStatus> {
  for (let below = node.backing; below && below !== base; below = below.backing) {
    const inside = bytesInside(below, offset, bytes);
    if (inside === 0) break;
    const st = await blockStatus(below, offset, inside);
    if (st.allocated) return st;
    bytes = st.bytes;
  }
  return { bytes, allocated: false, zero: true, data: false, node: null };
}

/** Does [offset, offset+bytes) read as zero from the chain `top` (null: nothing, zero)? Past its end it does. */
export async function chainReadsZero(top: BlockNode | null, offset: number, bytes: number): Promise<boolean> {
  const end = offset + Math.max(0, bytesInside(top, offset, bytes));
  for (let pos = offset; pos < end; ) {
    const st = await blockStatusAbove(top!, pos, end - pos);
    if (!st.zero) return false;
    pos += st.bytes;
  }
  return true;
}
