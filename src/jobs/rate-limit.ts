/**
 * A token bucket for a job's rate limit: the job does its work in chunks and
 * asks, after each, how long to wait before the next. Tokens refill at `rate`
 * bytes/s up to a burst of BURST_SECONDS' worth, so a job that was paused (or
 * slowed by its source) does not make up for lost time with a burst; a chunk
 * larger than the bucket simply waits longer afterwards (the bucket goes
 * negative), which keeps the average at the rate whatever the chunk size.
 */

/** How much a job may run ahead of its rate after an idle moment. */
const BURST_SECONDS = 0.1;

export class RateLimiter {
  private rate = 0;
  private tokens = 0;
  private last = 0;

  constructor(bytesPerSecond = 0, private readonly now: () => number = () => performance.now()) {
    this.setRate(bytesPerSecond);
  }

  /** 0: no limit. */
  get bytesPerSecond(): number {
    return this.rate;
  }

  setRate(bytesPerSecond: number): void {
    this.rate = bytesPerSecond;
    this.tokens = bytesPerSecond * BURST_SECONDS;
    this.last = this.now();
  }

  /** Account `bytes` just done; milliseconds to wait before the next chunk (0 when within the rate). */
  take(bytes: number): number {
    if (!this.rate) return 0;
    const now = this.now();
    this.tokens = Math.min(this.rate * BURST_SECONDS, this.tokens + ((now - this.last) * this.rate) / 1000);
    this.last = now;
    this.tokens -= bytes;
    return this.tokens >= 0 ? 0 : (-this.tokens / this.rate) * 1000;
  }

  /**
   * A chunk size that keeps the job responsive under the limit: a power of two
   * near a quarter second of work, between `min` and `max` (both powers of two,
   * so chunks stay aligned to any cluster size up to `min`).
   */
  chunkBytes(min: number, max: number): number {
    if (!this.rate) return max;
    let chunk = min;
    while (chunk * 2 <= max && chunk * 2 <= this.rate / 4) chunk *= 2;
    return chunk;
  }
}
