/** Scatter-gather helpers: views into buffer lists, never copies. */

export function iovBytes(iov: readonly Buffer[]): number {
  let n = 0;
  for (const b of iov) n += b.length;
  return n;
}

/** The `bytes` bytes of `iov` starting at `skip`, as views of the same memory. */
export function iovSlice(iov: readonly Buffer[], skip: number, bytes: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of iov) {
    if (bytes <= 0) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, bytes);
    out.push(skip === 0 && n === b.length ? b : b.subarray(skip, skip + n));
    bytes -= n;
    skip = 0;
  }
  return out;
}

const ZERO_CHUNK = Buffer.alloc(64 * 1024);

export function isZero(buf: Buffer): boolean {
  for (let off = 0; off < buf.length; off += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, buf.length - off);
    if (ZERO_CHUNK.compare(buf, off, off + n, 0, n) !== 0) return false;
  }
  return true;
}

export function iovIsZero(iov: readonly Buffer[]): boolean {
  return iov.every(isZero);
}

/** Fill the buffers of `iov` in turn from `src`, starting at `from` (a scatter copy). */
export function iovCopyFrom(iov: readonly Buffer[], src: Buffer, from = 0): void {
  for (const b of iov) {
    src.copy(b, 0, from, from + b.length);
    from += b.length;
  }
}
