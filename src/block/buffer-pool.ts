/**
 * Reusable I/O buffers. Memory touched once and then reused is much cheaper
 * than a fresh allocation per request: no page faults on first touch, no
 * munmap on free, and V8 counts every new ArrayBuffer towards its next full
 * garbage collection.
 *
 * Blocks come in power-of-two sizes (64 KiB and up) so that requests of
 * slightly different sizes share them. A buffer handed out must be given back
 * exactly once, and not used after.
 */
const MIN_BLOCK_BYTES = 64 * 1024;

export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private pooledBytes = 0;
  private readonly maxPooledBytes: number;

  /** Keep at most `maxPooledBytes` of idle blocks; more are left to the GC. */
  constructor(maxPooledBytes: number) {
    this.maxPooledBytes = maxPooledBytes;
  }

  /** A buffer of exactly `bytes` bytes, contents undefined. */
  take(bytes: number): Buffer {
    const size = blockSize(bytes);
    const block = this.free.get(size)?.pop();
    if (block) {
      this.pooledBytes -= size;
      return Buffer.from(block, 0, bytes);
    }
    // allocUnsafeSlow: a block of its own, never a slice of Node's shared 8 KiB pool.
    return Buffer.from(Buffer.allocUnsafeSlow(size).buffer, 0, bytes);
  }

  give(buf: Buffer): void {
    const block = buf.buffer as ArrayBuffer;
    const size = block.byteLength;
    if (buf.byteOffset !== 0 || size !== blockSize(size) || this.pooledBytes + size > this.maxPooledBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(block);
    this.pooledBytes += size;
  }
}

function blockSize(bytes: number): number {
  let size = MIN_BLOCK_BYTES;
  while (size < bytes) size *= 2;
  return size;
}
