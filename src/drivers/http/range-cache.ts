/**
 * The ranges of one remote image that are on their way or have arrived, and
 * the readahead that decides which ranges to fetch.
 *
 * - A read finds the ranges holding its bytes, starts fetches for the gaps
 *   (at least the minimum window each), and copies out as bytes arrive: it
 *   waits for its own bytes, not for the whole range holding them.
 * - Sequential reads grow a readahead window (twice what the stream has read,
 *   reset by a seek) that is kept on its way ahead of the reader, in pieces
 *   fetched side by side.
 * - Fetched ranges are kept in a small bounded cache.
 */
import { iovSlice } from '../../block/iov.js';
import { tracer } from '../../trace.js';
import { RangeBuffer } from './range-buffer.js';

const trace = tracer('http');

/** Readahead goes out in GETs of at most this much, several at once. */
const READAHEAD_PIECE_BYTES = 4 * 1024 * 1024;

export interface RangeCacheOptions {
  /** The image size (known once the driver has probed the server). */
  size: () => number;
  /** Fill `range` from the server; rejects when it cannot (retries are the caller's). */
  fetch: (range: RangeBuffer) => Promise<void>;
  readaheadMinBytes: number;
  readaheadMaxBytes: number;
  cacheBytes: number;
}

export class RangeCache {
  private readonly options: RangeCacheOptions;
  /** Ranges fetched or on their way, oldest first; bounded by cacheBytes. */
  private ranges: RangeBuffer[] = [];
  /** The latest read: [lastStart, lastEnd). */
  private lastStart = -1;
  private lastEnd = -1;
  /** Bytes read back to back since the last seek. */
  private streamBytes = 0;
  private window: number;

  constructor(options: RangeCacheOptions) {
    this.options = options;
    this.window = options.readaheadMinBytes;
  }

  /** Bytes of ranges held in the cache or on their way. */
  get cachedBytes(): number {
    let n = 0;
    for (const r of this.ranges) n += r.length;
    return n;
  }

  /** Read [offset, offset + bytes) into `iov`, fetching what is missing and reading ahead. */
  async read(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    const end = offset + bytes;
    const size = this.options.size();
    const sequential = offset === this.lastEnd;
    this.lastStart = offset;
    this.lastEnd = end;
    // The window grows with what the stream has read so far (twice as much, up to the
    // maximum) and starts over after a seek: sixteen 4 KiB reads in a row are no
    // reason to fetch megabytes.
    this.streamBytes = sequential ? this.streamBytes + bytes : bytes;
    this.window = Math.min(Math.max(2 * this.streamBytes, this.options.readaheadMinBytes), this.options.readaheadMaxBytes);
    // The ranges holding this read: gaps are fetched now, at least the minimum window each.
    const mine: RangeBuffer[] = [];
    for (let pos = offset; pos < end; ) {
      const range = this.rangeAt(pos) ?? this.startRange(pos, this.gapEnd(pos, Math.max(end, pos + this.options.readaheadMinBytes)));
      mine.push(range);
      pos = range.end;
    }
    // On a sequential stream, keep a window beyond this read on its way, in
    // pieces that stream side by side while the reader uses what has arrived.
    if (sequential) {
      const piece = Math.min(Math.max(this.window / 2, this.options.readaheadMinBytes), READAHEAD_PIECE_BYTES);
      const limit = Math.min(size, end + this.window);
      for (let pos = end; pos < limit; ) pos = (this.rangeAt(pos) ?? this.startRange(pos, this.gapEnd(pos, pos + piece))).end;
    }
    // Copy out as the bytes arrive.
    for (const range of mine) {
      const from = Math.max(offset, range.start);
      const to = Math.min(end, range.end);
      await range.arrived(to - range.start);
      let src = from - range.start;
      for (const b of iovSlice(iov, from - offset, to - from)) {
        range.copyTo(b, 0, src, b.length);
        src += b.length;
      }
    }
  }

  private rangeAt(pos: number): RangeBuffer | undefined {
    return this.ranges.find((r) => r.start <= pos && pos < r.end);
  }

  /** Start a fetch of [start, end); later reads find the range at once. */
  private startRange(start: number, end: number): RangeBuffer {
    if (trace.enabled) trace('fetch %d-%d (window %d)', start, end - 1, this.window);
    const range = new RangeBuffer(start, end);
    this.ranges.push(range);
    void this.fill(range);
    // Bounded memory: forget the oldest complete ranges, but not those of the latest
    // read nor the readahead window beyond it (a window larger than the cache would
    // otherwise evict itself and fetch it again). Anything else goes, wherever it
    // lies: a reader going backwards must not pile ranges up.
    // A reader holding a forgotten range keeps it alive until it has copied out.
    let kept = this.cachedBytes;
    const keepFrom = this.lastStart;
    const keepTo = this.lastEnd + this.window;
    while (kept > this.options.cacheBytes) {
      const i = this.ranges.findIndex((r) => r.complete && (r.end <= keepFrom || r.start >= keepTo));
      if (i < 0) break;
      kept -= this.ranges[i]!.length;
      this.ranges.splice(i, 1);
    }
    return range;
  }

  /** A range that cannot be filled fails its readers and leaves the cache: the next read asks again. */
  private async fill(range: RangeBuffer): Promise<void> {
    try {
      await this.options.fetch(range);
    } catch (err) {
      range.fail(err as Error);
      this.ranges = this.ranges.filter((r) => r !== range);
    }
  }

  /** Where a new range from `pos` ends: at `want`, the image end, or the next range, whichever is first. */
  private gapEnd(pos: number, want: number): number {
    let end = Math.min(want, this.options.size());
    for (const r of this.ranges) if (r.start > pos && r.start < end) end = r.start;
    return end;
  }
}
