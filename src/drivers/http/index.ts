/**
 * http(s): a read-only remote image over range requests (undici, one
 * keep-alive connection pool per image).
 *
 * - Size from the Content-Range of a `Range: bytes=0-0` GET at open. A server
 *   that ignores Range is refused there: vdisk never downloads a whole image by
 *   accident.
 * - Every range request carries the validator seen at open (If-Range with a
 *   strong ETag, else Last-Modified): a changed file answers 200 instead of 206 and the
 *   read fails with EIO. Old and new data are never mixed.
 * - Reads go through a cache of ranges in flight or arrived, with a readahead
 *   window that grows on sequential reads (range-cache.ts). Body chunks are
 *   handed to readers as they arrive (range-buffer.ts).
 * - Connection errors, timeouts and 5xx/429 answers are retried with backoff,
 *   bounded in count and time; every range GET has a deadline for its last
 *   byte (retry.ts).
 * - Numbers from the server (Content-Range, Content-Length) are checked before
 *   use: a size that is not a safe integer is refused at open (numbers.ts).
 * - Redirects are followed, but never from https to plain http (client.ts).
 * - Credentials in the URL become an Authorization header and never appear in
 *   messages or traces; neither does the query string, and header values are
 *   registered as secrets that traces mask (url.ts).
 */
import type { Dispatcher } from 'undici';
import type { BlockDriver, NetworkStats } from '../../block/driver.js';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import { createClient } from './client.js';
import { contentLengthIs, header, parseContentRange, quoteHeader } from './numbers.js';
import type { RangeBuffer } from './range-buffer.js';
import { RangeCache } from './range-cache.js';
import { Retrier, RetryableError, parseRetryAfter, rangeDeadlineMs } from './retry.js';
import { displayUrl, requestHeaders } from './url.js';

const trace = tracer('http');

export interface HttpOptions {
  /** Extra request headers, e.g. Authorization. */
  headers?: Record<string, string>;
  /** PEM file with more CA certificates to trust, besides the system's. */
  caFile?: string;
  /** Accept any TLS certificate. */
  insecure?: boolean;
  /** Per request: time to the response headers, and between body chunks. */
  timeoutMs?: number;
  /** Attempts per range after the first. */
  retries?: number;
  /** Give up on a range after this long, retries included. */
  retryBudgetMs?: number;
  maxRedirects?: number;
  connections?: number;
  readaheadMinBytes?: number;
  readaheadMaxBytes?: number;
  cacheBytes?: number;
}

/** The counters every network protocol keeps (block/driver.ts). */
export type HttpStats = NetworkStats;

const DEFAULTS = {
  timeoutMs: 30_000,
  retries: 5,
  retryBudgetMs: 120_000,
  maxRedirects: 5,
  connections: 8,
  readaheadMinBytes: 128 * 1024,
  readaheadMaxBytes: 16 * 1024 * 1024,
  cacheBytes: 64 * 1024 * 1024,
};

export class HttpDriver implements BlockDriver {
  readonly formatName = 'raw';
  readonly limits = { requestAlignment: 1, maxTransfer: 32 * 1024 * 1024 };
  readonly readOnly = true;
  readonly url: URL;
  readonly name: string;
  readonly stats: HttpStats = { requests: 0, bytesFetched: 0, retries: 0 };
  /** The same counters, under the name the graph asks for (stats.ts). */
  get networkStats(): NetworkStats {
    return this.stats;
  }
  private readonly options: typeof DEFAULTS & HttpOptions;
  private readonly dispatcher: Dispatcher;
  private readonly headers: Record<string, string>;
  private readonly retrier: Retrier;
  private readonly cache: RangeCache;
  private bytes = 0;
  private validator: string | null = null;
  private closed = false;

  private constructor(url: URL, options: HttpOptions) {
    this.options = { ...DEFAULTS, ...options };
    // The CLI checks its options; this guards other callers (a NaN timeout would fire every deadline at once).
    if (!(this.options.timeoutMs > 0 && this.options.timeoutMs <= 2 ** 31 - 1)) throw new VdiskError('ERR_USAGE', `HTTP timeout ${this.options.timeoutMs} ms is not between 1 ms and 24 days`);
    // Credentials move from the URL into a header, so the URL can be shown.
    this.headers = requestHeaders(url, options.headers);
    this.url = url;
    this.name = displayUrl(url);
    this.dispatcher = createClient(url, this.name, this.options);
    this.retrier = new Retrier(this.name, this.options, this.stats);
    this.cache = new RangeCache({ ...this.options, size: () => this.bytes, fetch: (range) => this.fill(range) });
  }

  static async open(url: string, options: HttpOptions = {}): Promise<HttpDriver> {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new VdiskError('ERR_USAGE', `bad URL ${displayUrl(url)}`);
    }
    const drv = new HttpDriver(parsed, options);
    try {
      await drv.probe();
    } catch (err) {
      await drv.close();
      throw err;
    }
    return drv;
  }

  size(): number {
    return this.bytes;
  }

  /**
   * Size, validator, and whether ranges work, all from one `Range: bytes=0-0`
   * GET. (A HEAD would not do: signed URLs are often signed for GET only, and
   * a HEAD answer need not carry the length.)
   */
  private async probe(): Promise<void> {
    const res = await this.retrier.run('GET bytes=0-0', async () => {
      const r = await this.dispatcher.request({ origin: this.url.origin, path: this.path, method: 'GET', headers: { ...this.headers, range: 'bytes=0-0' } });
      this.stats.requests++;
      if (r.statusCode >= 500 || r.statusCode === 429) {
        await r.body.dump();
        throw new RetryableError(`HTTP ${r.statusCode}`, parseRetryAfter(header(r.headers, 'retry-after')));
      }
      return r;
    });
    // Never read a 200 body here: it would be the whole image.
    await res.body.dump({ limit: 0 }).catch(() => undefined);
    const status = res.statusCode;
    if (status === 200) throw new VdiskError('ERR_HTTP_NO_RANGES', `${this.name}: the server ignores Range requests; vdisk will not download the whole image`);
    if (status === 404 || status === 410) throw new VdiskError('ERR_IMAGE_NOT_FOUND', `${this.name}: HTTP ${status}`);
    if (status === 401 || status === 403) throw new VdiskError('EACCES', `${this.name}: HTTP ${status} (credentials? --header 'Authorization: ...')`);
    if (status !== 206) throw new VdiskError('ERR_HTTP', `${this.name}: HTTP ${status} to a range request`);
    // The size goes to the kernel as an off_t and into every offset computed here: a safe integer or nothing.
    const contentRange = header(res.headers, 'content-range');
    const range = parseContentRange(contentRange);
    if (!range || range.start !== 0 || range.end !== 0) {
      throw new VdiskError('ERR_HTTP', `${this.name}: unusable Content-Range ${quoteHeader(contentRange)} in the answer to bytes=0-0 (want 'bytes 0-0/SIZE', SIZE below 2^53)`);
    }
    if (range.total === null) throw new VdiskError('ERR_HTTP', `${this.name}: a 206 answer without the total size in Content-Range`);
    this.bytes = range.total;
    // If-Range takes a strong ETag only (RFC 9110 13.1.5): a weak one gives way to Last-Modified.
    const etag = header(res.headers, 'etag');
    this.validator = (etag && !etag.startsWith('W/') ? etag : undefined) ?? header(res.headers, 'last-modified') ?? null;
    if (!this.validator) trace('%s has neither a strong ETag nor Last-Modified: changes cannot be detected', this.name);
    trace('open url=%s size=%d validator=%s', this.name, this.bytes, this.validator);
  }

  private get path(): string {
    return `${this.url.pathname}${this.url.search}`;
  }

  /**
   * Fill `range` from the server: GETs of what has not arrived yet, retried
   * within the budget. A retry after a dropped connection asks only for the
   * rest, so bytes readers already have are never fetched twice.
   */
  private fill(range: RangeBuffer): Promise<void> {
    return this.retrier.run(`GET bytes=${range.start}-${range.end - 1}`, () => this.get(range));
  }

  /**
   * One GET of [start + received, end) with the validator, through undici's
   * dispatch API: body chunks go straight into the range as they arrive, with
   * no stream object in between. Resolves when the range is complete, fails
   * (retryably) when it is not complete by its deadline.
   */
  private get(range: RangeBuffer): Promise<void> {
    const start = range.start + range.received;
    const end = range.end;
    const what = `GET bytes=${start}-${end - 1}`;
    const headers: Record<string, string> = { ...this.headers, range: `bytes=${start}-${end - 1}` };
    if (this.validator) headers['if-range'] = this.validator;
    this.stats.requests++;
    const deadlineMs = rangeDeadlineMs(end - start, this.options.timeoutMs);
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      /** The latest hop's (redirects make several). */
      let controller: Dispatcher.DispatchController | null = null;
      const settle = (err?: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve();
      };
      const timer = setTimeout(() => {
        const err = new RetryableError(`${end - start} bytes not complete within ${(deadlineMs / 1000).toFixed(1)} s (--http-timeout plus 1 s per 64 KiB)`);
        trace('deadline %s: %d of %d bytes after %d ms', what, range.received - (start - range.start), end - start, deadlineMs);
        settle(err);
        controller?.abort(err);
      }, deadlineMs);
      this.dispatcher.dispatch(
        { origin: this.url.origin, path: this.path, method: 'GET', headers },
        {
          // Its presence also tells undici this handler speaks the new (controller) API.
          onRequestStart: (c) => {
            controller = c;
            if (settled) c.abort(new RetryableError('deadline passed'));
          },
          onResponseStart: (controller, statusCode, resHeaders) => {
            const err = this.checkRangeAnswer(statusCode, resHeaders, start, end, what);
            if (err) {
              // Never read the body of a wrong answer: a 200 would be the whole image.
              settle(err);
              controller.abort(err);
            }
          },
          onResponseData: (controller, chunk) => {
            if (settled) return;
            if (range.received + chunk.length > range.length) {
              const err = new VdiskError('EIO', `${this.name}: more data than asked for in ${what}`);
              settle(err);
              controller.abort(err);
              return;
            }
            this.stats.bytesFetched += chunk.length;
            range.append(chunk);
          },
          onResponseEnd: () => {
            if (range.complete) settle();
            else settle(new RetryableError(`short body: ${range.received - (start - range.start)} of ${end - start} bytes`));
          },
          onResponseError: (_controller, err) => settle(err),
        },
      );
    });
  }

  /** Why an answer to a range GET cannot be used, or null when it is the range asked for. */
  private checkRangeAnswer(statusCode: number, h: Record<string, string | string[] | undefined>, start: number, end: number, what: string): Error | null {
    if (statusCode === 206) {
      const range = parseContentRange(header(h, 'content-range'));
      if (!range || range.start !== start || range.end !== end - 1) {
        return new VdiskError('EIO', `${this.name}: asked for ${what.slice(4)}, got Content-Range ${quoteHeader(header(h, 'content-range'))}`);
      }
      if (range.total !== null && range.total !== this.bytes) {
        return new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: the remote image changed since it was opened (size ${this.bytes} is now ${range.total})`);
      }
      if (!contentLengthIs(header(h, 'content-length'), end - start)) {
        return new VdiskError('EIO', `${this.name}: Content-Length ${quoteHeader(header(h, 'content-length'))} in the answer to ${what}, which is ${end - start} bytes`);
      }
      // If-Range already asks for this; a server that ignores it is caught here.
      const etag = header(h, 'etag');
      if (etag && this.validator?.startsWith('"') && etag !== this.validator) {
        return new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: the remote image changed since it was opened (ETag ${this.validator} is now ${etag})`);
      }
      return null;
    }
    // A 200 to a range request is never the range: with If-Range it means the file changed.
    if (statusCode === 200 || statusCode === 412) {
      return new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: the remote image changed since it was opened (validator ${this.validator ?? 'none'}); refusing to mix old and new data`);
    }
    if (statusCode >= 500 || statusCode === 429) return new RetryableError(`HTTP ${statusCode}`, parseRetryAfter(header(h, 'retry-after')));
    if (statusCode === 416) return new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: ${what} is past the end: the remote image shrank`);
    return new VdiskError('ERR_HTTP', `${this.name}: HTTP ${statusCode} to ${what}`);
  }

  /** Bytes of ranges held in the cache or on their way. */
  get cachedBytes(): number {
    return this.cache.cachedBytes;
  }

  preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    return this.cache.read(offset, bytes, iov);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.retrier.close();
    // Every read has been answered by now: what is still on its way is readahead
    // nobody will use, and a slow server must not hold up the exit.
    await this.dispatcher.destroy().catch(() => undefined);
  }
}
