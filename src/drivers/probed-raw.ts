/**
 * The guard a raw image gets when its format was probed rather than given:
 * a guest that owns the disk could otherwise write a qcow2 header naming any
 * host file as its backing file into sector 0, and the next probed open would
 * serve that file. As QEMU's raw driver does for a probed image, a write,
 * write-zeroes or discard that would leave the first sector probing as another
 * format is refused with EPERM; everything else passes straight through to the
 * file driver. `-f raw` opens the image without this guard.
 *
 * Requests that touch the first sector run one at a time, each checked against
 * what the last one left, so two partial writes cannot assemble a header that
 * neither would have made alone.
 */
import type { BlockDriver, DriverBlockStatus, ZeroFlags } from '../block/driver.js';
import { PROBE_BYTES } from '../block/probe.js';
import { VdiskError, notSupported } from '../errors.js';
import { iovSlice } from '../block/iov.js';
import { tracer } from '../trace.js';

const trace = tracer('probe');

export class ProbedRawDriver implements BlockDriver {
  readonly formatName = 'raw';
  readonly inner: BlockDriver;
  private readonly name: string;
  /** The registry's probe: every format it knows, opened or not (registry.ts). */
  private readonly probeHead: (head: Buffer) => string;
  /** The tail of the chain of requests touching the first sector. */
  private headLock: Promise<void> = Promise.resolve();

  blockStatus?: (offset: number, bytes: number) => Promise<DriverBlockStatus>;
  flush?: () => Promise<void>;
  truncate?: (size: number) => Promise<void>;
  allocatedBytes?: () => Promise<number>;
  mayAllocate?: (offset: number, bytes: number) => boolean;

  /** `name`: the image as messages show it. */
  constructor(inner: BlockDriver, name: string, probeHead: (head: Buffer) => string) {
    this.inner = inner;
    this.name = name;
    this.probeHead = probeHead;
    // What the file driver has, this one has; what it lacks stays absent (the request layer's fallback signal).
    if (inner.blockStatus) this.blockStatus = (offset, bytes) => inner.blockStatus!(offset, bytes);
    if (inner.flush) this.flush = () => inner.flush!();
    if (inner.truncate) this.truncate = (size) => inner.truncate!(size);
    if (inner.allocatedBytes) this.allocatedBytes = () => inner.allocatedBytes!();
    if (inner.mayAllocate) this.mayAllocate = (offset, bytes) => inner.mayAllocate!(offset, bytes);
  }

  get discardLeaves() {
    return this.inner.discardLeaves;
  }

  get limits() {
    return this.inner.limits;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  get growable(): boolean | undefined {
    return this.inner.growable;
  }

  get allocationAlignment(): number | undefined {
    return this.inner.allocationAlignment;
  }

  size(): number {
    return this.inner.size();
  }

  preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    return this.inner.preadv(offset, bytes, iov);
  }

  // Not async: a write past the first sector is the inner driver's promise, with no layer of our own.
  pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    const inner = this.inner;
    if (!inner.pwritev) return Promise.reject(new VdiskError('EROFS', `${this.name} cannot be written`));
    if (offset >= PROBE_BYTES) return inner.pwritev(offset, bytes, iov);
    return this.checkedHeadWrite(offset, bytes, 'write', (head, from, to) => copyIovInto(head, from, iovSlice(iov, from - offset, to - from)), () => inner.pwritev!(offset, bytes, iov));
  }

  pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    const inner = this.inner;
    if (!inner.pwriteZeroes) return Promise.reject(notSupported(`write-zeroes on ${this.name}`));
    if (offset >= PROBE_BYTES) return inner.pwriteZeroes(offset, bytes, flags);
    return this.checkedHeadWrite(offset, bytes, 'write-zeroes', (head, from, to) => head.fill(0, from, to), () => inner.pwriteZeroes!(offset, bytes, flags));
  }

  /** A discarded range of a host file reads as zero afterwards: checked as zeroes. */
  pdiscard(offset: number, bytes: number): Promise<void> {
    const inner = this.inner;
    if (!inner.pdiscard) return Promise.reject(notSupported(`discard on ${this.name}`));
    if (offset >= PROBE_BYTES) return inner.pdiscard(offset, bytes);
    return this.checkedHeadWrite(offset, bytes, 'discard', (head, from, to) => head.fill(0, from, to), () => inner.pdiscard!(offset, bytes));
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  /**
   * Under the head lock: build the first sector as it would be after the
   * request (`apply` fills [from, to) of it), probe it, and run `write` only if
   * it still probes as raw.
   */
  private async checkedHeadWrite(offset: number, bytes: number, op: string, apply: (head: Buffer, from: number, to: number) => void, write: () => Promise<void>): Promise<void> {
    const prev = this.headLock;
    let release!: () => void;
    this.headLock = new Promise((resolve) => (release = resolve));
    await prev;
    try {
      const align = this.inner.limits.requestAlignment ?? 1;
      const window = Math.min(this.size(), Math.ceil(PROBE_BYTES / align) * align);
      const head = Buffer.alloc(window);
      const end = Math.min(offset + bytes, window);
      // A request covering the whole sector needs nothing of what was there.
      if (offset > 0 || end < window) await this.inner.preadv(0, window, [head]);
      apply(head, offset, end);
      const format = this.probeHead(head);
      if (format !== 'raw') {
        trace('refused %s offset=%d bytes=%d: the first sector would probe as %s', op, offset, bytes, format);
        throw new VdiskError(
          'EPERM',
          `${this.name}: ${op} refused: it would make the first sector probe as ${format}, and this image's format was probed, not given (mount with -f raw to write it)`,
        );
      }
      await write();
    } finally {
      release();
    }
  }
}

/** Copy the buffers of `iov` into `head` from position `at` on. */
function copyIovInto(head: Buffer, at: number, iov: Buffer[]): void {
  for (const b of iov) at += b.copy(head, at);
}
