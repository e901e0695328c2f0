/**
 * A range on its way from the server or arrived, kept as the buffers the body
 * came in (assembling one big buffer would cost a copy of every byte).
 * Readers copy out the prefix that has arrived and wait only for the bytes
 * they need, not for the whole range.
 */
export class RangeBuffer {
  readonly start: number;
  readonly end: number;
  /** Bytes arrived so far, from `start`. */
  received = 0;
  failed: Error | null = null;
  private readonly parts: Buffer[] = [];
  /** ends[i]: offset (within the range) just past parts[i]. */
  private readonly ends: number[] = [];
  private waiters: { need: number; resolve: () => void; reject: (err: Error) => void }[] = [];

  constructor(start: number, end: number) {
    this.start = start;
    this.end = end;
  }

  get length(): number {
    return this.end - this.start;
  }

  get complete(): boolean {
    return this.received === this.length;
  }

  append(chunk: Buffer): void {
    this.parts.push(chunk);
    this.ends.push((this.received += chunk.length));
    if (this.waiters.length === 0) return;
    const ready = this.waiters.filter((w) => w.need <= this.received);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => w.need > this.received);
    for (const w of ready) w.resolve();
  }

  fail(err: Error): void {
    this.failed = err;
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w.reject(err);
  }

  /** Resolves once the first `need` bytes of the range have arrived. */
  arrived(need: number): Promise<void> {
    if (need <= this.received) return Promise.resolve();
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => this.waiters.push({ need, resolve, reject }));
  }

  /** Copy `n` arrived bytes from range offset `from` into `dst` at `at`. */
  copyTo(dst: Buffer, at: number, from: number, n: number): void {
    let lo = 0;
    let hi = this.ends.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.ends[mid]! <= from) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; n > 0; i++) {
      const part = this.parts[i]!;
      const partStart = this.ends[i]! - part.length;
      const k = Math.min(n, this.ends[i]! - from);
      part.copy(dst, at, from - partStart, from - partStart + k);
      at += k;
      from += k;
      n -= k;
    }
  }
}
