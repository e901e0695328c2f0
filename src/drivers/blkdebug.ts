/**
 * blkdebug: a filter node that injects faults, in the spirit of QEMU's blkdebug.
 * Rules fail chosen operations at chosen offsets with a chosen error code, or
 * delay them, so error paths are tested for real. Everything else passes
 * through to the child node via the request layer.
 */
import type { BlockDriver, ChildLink, DriverBlockStatus, ZeroFlags } from '../block/driver.js';
import type { BlockNode } from '../block/node.js';
import * as io from '../block/io.js';
import { blockStatus } from '../block/block-status.js';
import { VdiskError, notSupported, type ErrorCode } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('blkdebug');

export type BlkdebugOp = 'read' | 'write' | 'zero' | 'discard' | 'flush' | 'status';

export interface BlkdebugRule {
  op: BlkdebugOp;
  /** The rule fires for requests overlapping [offset, offset+bytes); whole disk when absent. */
  offset?: number;
  bytes?: number;
  /** Fail with this code... */
  error?: ErrorCode;
  /** ...or hold the request this long before passing it on. */
  delayMs?: number;
  /** Fire this many times, then retire (default: forever). */
  count?: number;
}

export class BlkdebugDriver implements BlockDriver {
  readonly formatName = 'blkdebug';
  readonly child: BlockNode;
  private readonly rules: BlkdebugRule[];
  /** How often each rule fired, by index. */
  readonly hits: number[];

  constructor(child: BlockNode, rules: BlkdebugRule[] = []) {
    this.child = child;
    this.rules = rules.map((r) => ({ ...r }));
    this.hits = rules.map(() => 0);
  }

  get limits() {
    return this.child.limits;
  }

  get readOnly(): boolean {
    return this.child.readOnly;
  }

  /** A filter over a growable file is growable too (it can sit under a format driver). */
  get growable(): boolean {
    return Boolean(this.child.driver.growable);
  }

  async truncate(size: number): Promise<void> {
    await this.child.truncate(size);
  }

  children(): ChildLink[] {
    return [{ role: 'filtered', node: this.child }];
  }

  addRule(rule: BlkdebugRule): void {
    this.rules.push({ ...rule });
    this.hits.push(0);
  }

  size(): number {
    return this.child.size();
  }

  private async inject(op: BlkdebugOp, offset: number, bytes: number): Promise<void> {
    for (const [i, rule] of this.rules.entries()) {
      if (rule.op !== op || rule.count === 0) continue;
      const start = rule.offset ?? 0;
      const end = rule.bytes === undefined ? Infinity : start + rule.bytes;
      if (!(offset < end && start < offset + Math.max(bytes, 1))) continue;
      this.hits[i] = (this.hits[i] ?? 0) + 1;
      if (rule.count !== undefined) rule.count--;
      trace('inject op=%s offset=%d bytes=%d rule=%d', op, offset, bytes, i);
      if (rule.delayMs) await new Promise((resolve) => setTimeout(resolve, rule.delayMs));
      if (rule.error) throw new VdiskError(rule.error, `blkdebug: injected ${rule.error} on ${op} offset=${offset} bytes=${bytes}`);
    }
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    await this.inject('read', offset, bytes);
    await io.preadv(this.child, offset, bytes, iov);
  }

  async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    await this.inject('write', offset, bytes);
    await io.pwritev(this.child, offset, bytes, iov);
  }

  async pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    await this.inject('zero', offset, bytes);
    await io.pwriteZeroes(this.child, offset, bytes, flags);
  }

  async pdiscard(offset: number, bytes: number): Promise<void> {
    await this.inject('discard', offset, bytes);
    await io.pdiscard(this.child, offset, bytes);
  }

  async blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    await this.inject('status', offset, bytes);
    const st = await blockStatus(this.child, offset, bytes);
    return { bytes: st.bytes, allocated: st.allocated, zero: st.zero, data: st.data };
  }

  async flush(): Promise<void> {
    await this.inject('flush', 0, 0);
    await io.flush(this.child);
  }

  async allocatedBytes(): Promise<number> {
    return this.child.allocatedBytes();
  }

  async close(): Promise<void> {
    await this.child.close();
  }
}
