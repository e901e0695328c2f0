/**
 * A backing node shorter than the node above it: what lies past its end reads
 * as zero (as in QEMU). The one place that rule is written; block status
 * (blockStatusAbove) and reads through to a backing node (io.readBacking) use it.
 */
import type { BlockNode } from './node.js';

/** How many bytes of [offset, offset+bytes) lie inside `node` (0 without a node): the rest reads as zero. */
export function bytesInside(node: BlockNode | null, offset: number, bytes: number): number {
  return node ? Math.max(0, Math.min(bytes, node.size() - offset)) : 0;
}
