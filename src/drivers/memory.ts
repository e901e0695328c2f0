/**
 * memory: a sparse in-memory disk for tests. Chunks are allocated on first
 * write, so a terabyte-sized node costs nothing until written. It records what
 * reached it (largest buffer, bytes written) so tests can check the request
 * layer's guarantees.
 */
import assert from 'node:assert/strict';
import type { BlockDriver, BlockLimits, DriverBlockStatus, ZeroFlags } from '../block/driver.js';
import { iovBytes } from '../block/iov.js';
import { notSupported } from '../errors.js';

const CHUNK_BYTES = 64 * 1024;

export interface MemoryOptions {
  size: number;
  limits?: Partial<BlockLimits>;
  /** Implement write-zeroes natively (drop chunks) instead of leaving it to the fallback. */
  nativeZeroes?: boolean;
  /** Keep written data (false: a null device that only counts, for huge-range tests). */
  keepData?: boolean;
  readOnly?: boolean;
  /** Unwritten ranges are unallocated (the backing node shows through) instead of zero. */
  unwrittenIsUnallocated?: boolean;
}

export class MemoryDriver implements BlockDriver {
  readonly formatName = 'memory';
  readonly limits: Partial<BlockLimits>;
  readonly discardLeaves: 'zero' | 'unallocated';
  readOnly: boolean;
  private readonly bytes: number;
  private readonly chunks = new Map<number, Buffer>();
  private readonly options: MemoryOptions;
  /** Largest single buffer handed to pwritev, and all bytes written through it. */
  largestWriteBuffer = 0;
  bytesWritten = 0;
  readonly calls: Array<{ op: string; offset: number; bytes: number }> = [];
  recordCalls = false;

  constructor(options: MemoryOptions) {
    this.options = options;
    this.discardLeaves = options.unwrittenIsUnallocated ? 'unallocated' : 'zero';
    this.bytes = options.size;
    this.limits = options.limits ?? {};
    this.readOnly = options.readOnly ?? false;
  }

  size(): number {
    return this.bytes;
  }

  async reopen(readOnly: boolean): Promise<void> {
    this.readOnly = readOnly;
  }

  private checkAligned(op: string, offset: number, bytes: number): void {
    const align = this.limits.requestAlignment ?? 1;
    assert(offset % align === 0 && bytes % align === 0, `memory ${op}: unaligned offset=${offset} bytes=${bytes}`);
    assert(bytes <= (this.limits.maxTransfer ?? Infinity) || op === 'zero' || op === 'discard', `memory ${op}: ${bytes} exceeds maxTransfer`);
    assert(offset + bytes <= this.bytes, `memory ${op}: beyond the end`);
    if (this.recordCalls) this.calls.push({ op, offset, bytes });
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    this.checkAligned('read', offset, bytes);
    assert.equal(iovBytes(iov), bytes);
    await Promise.resolve(); // complete asynchronously, like real I/O
    let pos = offset;
    for (const buf of iov) {
      for (let done = 0; done < buf.length; ) {
        const idx = Math.floor(pos / CHUNK_BYTES);
        const within = pos % CHUNK_BYTES;
        const n = Math.min(CHUNK_BYTES - within, buf.length - done);
        const chunk = this.chunks.get(idx);
        if (chunk) chunk.copy(buf, done, within, within + n);
        else buf.fill(0, done, done + n);
        done += n;
        pos += n;
      }
    }
  }

  async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    this.checkAligned('write', offset, bytes);
    assert.equal(iovBytes(iov), bytes);
    await Promise.resolve();
    this.bytesWritten += bytes;
    let pos = offset;
    for (const buf of iov) {
      this.largestWriteBuffer = Math.max(this.largestWriteBuffer, buf.length);
      if (this.options.keepData === false) {
        pos += buf.length;
        continue;
      }
      for (let done = 0; done < buf.length; ) {
        const idx = Math.floor(pos / CHUNK_BYTES);
        const within = pos % CHUNK_BYTES;
        const n = Math.min(CHUNK_BYTES - within, buf.length - done);
        let chunk = this.chunks.get(idx);
        if (!chunk) this.chunks.set(idx, (chunk = Buffer.alloc(CHUNK_BYTES)));
        buf.copy(chunk, within, done, done + n);
        done += n;
        pos += n;
      }
    }
  }

  async pwriteZeroes(offset: number, bytes: number, _flags: ZeroFlags): Promise<void> {
    if (!this.options.nativeZeroes) throw notSupported('memory write-zeroes');
    this.checkAligned('zero', offset, bytes);
    await Promise.resolve();
    this.zeroRange(offset, bytes);
  }

  async pdiscard(offset: number, bytes: number): Promise<void> {
    this.checkAligned('discard', offset, bytes);
    await Promise.resolve();
    this.zeroRange(offset, bytes);
  }

  private zeroRange(offset: number, bytes: number): void {
    for (let pos = offset; pos < offset + bytes; ) {
      const idx = Math.floor(pos / CHUNK_BYTES);
      const within = pos % CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - within, offset + bytes - pos);
      const chunk = this.chunks.get(idx);
      if (chunk) {
        if (n === CHUNK_BYTES) this.chunks.delete(idx);
        else chunk.fill(0, within, within + n);
      }
      pos += n;
    }
  }

  async blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    const first = this.chunks.has(Math.floor(offset / CHUNK_BYTES));
    let end = offset;
    while (end < offset + bytes && this.chunks.has(Math.floor(end / CHUNK_BYTES)) === first) {
      end = (Math.floor(end / CHUNK_BYTES) + 1) * CHUNK_BYTES;
    }
    const n = Math.min(end, offset + bytes) - offset;
    if (first) return { bytes: n, allocated: true, zero: false, data: true };
    return { bytes: n, allocated: !this.options.unwrittenIsUnallocated, zero: true, data: false };
  }

  async flush(): Promise<void> {}

  async allocatedBytes(): Promise<number> {
    return this.chunks.size * CHUNK_BYTES;
  }

  async close(): Promise<void> {}
}
