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
 * - Sequential reads grow a readahead window (twice what the stream has read,
 *   reset by a seek) that is kept on its way ahead of the reader, in pieces
 *   fetched side by side. Body chunks are handed to readers as they arrive:
 *   a read waits for its own bytes, not for the whole range holding them.
 *   Fetched ranges are kept in a small bounded cache.
 * - Connection errors, timeouts and 5xx/429 answers are retried with backoff
 *   (honouring Retry-After up to --http-timeout or 10 s), bounded in count and time.
 * - Every range GET has a deadline for its last byte (http-numbers.ts:
 *   --http-timeout plus the bytes at 64 KiB/s): a server trickling bytes
 *   cannot hold a read longer than that, retries and their budget aside.
 * - Numbers from the server (Content-Range, Content-Length, Retry-After) are
 *   checked before use: a size that is not a safe integer is refused at open.
 * - Redirects are followed, but never from https to plain http (http-redirects.ts).
 * - Credentials in the URL become an Authorization header and never appear in
 *   messages or traces; neither does the query string (url-display.ts), and
 *   header values are registered as secrets that traces mask (secrets.ts).
 */
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, interceptors, type Dispatcher } from 'undici';
import type { BlockDriver } from '../block/driver.js';
import { iovSlice } from '../block/iov.js';
import { VdiskError } from '../errors.js';
import { addSecret } from '../secrets.js';
import { tracer } from '../trace.js';
import { MAX_RETRY_AFTER_MS, contentLengthIs, parseContentRange, parseRetryAfter, quoteHeader, rangeDeadlineMs } from './http-numbers.js';
import { httpsOnly } from './http-redirects.js';
import { displayUrl } from './url-display.js';

export { displayName, displayUrl, isHttpUrl } from './url-display.js';

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

export interface HttpStats {
  requests: number;
  bytesFetched: number;
  retries: number;
}

/** Debian's system CA store (ca-certificates). */
const SYSTEM_CA_BUNDLE = '/etc/ssl/certs/ca-certificates.crt';

/** Readahead goes out in GETs of at most this much, several at once. */
const READAHEAD_PIECE_BYTES = 4 * 1024 * 1024;

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

class RetryableError extends Error {
  retryAfterMs: number | undefined;
  constructor(message: string, retryAfterMs?: number) {
    super(message);
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * A range on its way from the server or arrived, kept as the buffers the body
 * came in (assembling one big buffer would cost a copy of every byte).
 * Readers copy out the prefix that has arrived and wait only for the bytes
 * they need, not for the whole range.
 */
class RangeBuffer {
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

/**
 * A header undici would refuse, refused first as a usage error (undici's error has no
 * code of ours). Neither the value nor a bad name is quoted: either may hold a credential.
 */
function checkHeader(name: string, value: string): void {
  if (!/^[!#$%&'*+.^_`|~0-9a-z-]+$/i.test(name)) throw new VdiskError('ERR_USAGE', 'an HTTP header name has a character HTTP does not allow in names');
  if (/[\0-\x08\x0a-\x1f\x7f]/.test(value)) throw new VdiskError('ERR_USAGE', `the value of HTTP header '${name}' has a control character (a line break?)`);
}

function header(h: Record<string, string | string[] | undefined>, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v[0] : v;
}

export class HttpDriver implements BlockDriver {
  readonly formatName = 'raw';
  readonly limits = { requestAlignment: 1, maxTransfer: 32 * 1024 * 1024 };
  readonly readOnly = true;
  readonly url: URL;
  readonly name: string;
  readonly stats: HttpStats = { requests: 0, bytesFetched: 0, retries: 0 };
  private readonly options: typeof DEFAULTS & HttpOptions;
  private readonly dispatcher: Dispatcher;
  private readonly headers: Record<string, string>;
  private bytes = 0;
  private validator: string | null = null;
  /** Ranges fetched or on their way, oldest first; bounded by cacheBytes. */
  private ranges: RangeBuffer[] = [];
  /** The latest read: [lastStart, lastEnd). */
  private lastStart = -1;
  private lastEnd = -1;
  /** Bytes read back to back since the last seek. */
  private streamBytes = 0;
  private window: number;
  private closed = false;
  /** Aborted by close(): a retry waiting out its backoff must not hold the process up. */
  private readonly closing = new AbortController();

  private constructor(url: URL, options: HttpOptions) {
    this.options = { ...DEFAULTS, ...options };
    // The CLI checks its options; this guards other callers (a NaN timeout would fire every deadline at once).
    if (!(this.options.timeoutMs > 0 && this.options.timeoutMs <= 2 ** 31 - 1)) throw new VdiskError('ERR_USAGE', `HTTP timeout ${this.options.timeoutMs} ms is not between 1 ms and 24 days`);
    this.headers = { 'user-agent': 'vdisk', ...(options.headers ?? {}) };
    // Credentials move from the URL into a header, so the URL can be shown.
    if (url.username || url.password) {
      const cred = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
      this.headers['authorization'] ??= `Basic ${Buffer.from(cred).toString('base64')}`;
      addSecret(url.password);
      addSecret(decodeURIComponent(url.password));
      url.username = '';
      url.password = '';
    }
    // Whatever slips past the display form is masked in traces and error lines.
    addSecret(url.search.slice(1));
    for (const [name, value] of Object.entries(this.headers)) {
      if (name !== 'user-agent') addSecret(value);
      checkHeader(name, value);
    }
    this.url = url;
    this.name = displayUrl(url);
    this.window = this.options.readaheadMinBytes;
    const connect: Record<string, unknown> = {};
    // Trust the system's CA store (Node otherwise uses its own bundle), plus --ca-file.
    const cas: Buffer[] = [];
    if (fs.existsSync(SYSTEM_CA_BUNDLE)) cas.push(fs.readFileSync(SYSTEM_CA_BUNDLE));
    if (options.caFile) cas.push(fs.readFileSync(options.caFile));
    if (cas.length) connect['ca'] = cas;
    if (options.insecure) connect['rejectUnauthorized'] = false;
    this.dispatcher = new Agent({
      connections: this.options.connections,
      keepAliveTimeout: 30_000,
      headersTimeout: this.options.timeoutMs,
      bodyTimeout: this.options.timeoutMs,
      connect,
    }).compose([
      // Below the redirect interceptor, so that it sees every hop.
      ...(url.protocol === 'https:' ? [httpsOnly(this.name)] : []),
      interceptors.redirect({ maxRedirections: this.options.maxRedirects }),
    ]);
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
    const res = await this.withRetries('GET bytes=0-0', async () => {
      const r = await this.dispatcher.request({ origin: this.url.origin, path: this.path, method: 'GET', headers: { ...this.headers, range: 'bytes=0-0' } });
      this.stats.requests++;
      if (r.statusCode >= 500 || r.statusCode === 429) {
        await r.body.dump();
        throw new RetryableError(`HTTP ${r.statusCode}`, parseRetryAfter(r.headers['retry-after']));
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

  /** A certificate that does not verify, said plainly with what to do about it; null for other errors. */
  private explainTls(err: unknown): VdiskError | null {
    const code = (err as { code?: string }).code ?? '';
    if (!/CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|ERR_TLS/.test(code)) return null;
    return new VdiskError('ERR_HTTP_TLS', `${this.name}: TLS: ${(err as Error).message} (${code}); --ca-file FILE trusts a CA, --insecure skips the check`, { cause: err });
  }

  /**
   * Ours as they are; any other failure (a name that does not resolve, TLS
   * spoken to a plain-http port, undici's own) as ERR_HTTP naming the image:
   * the raw error's code is not in the error table and its message may not
   * say which URL failed (an OpenSSL line, 'getaddrinfo ENOTFOUND host').
   */
  private named(what: string, err: unknown): unknown {
    if (err instanceof VdiskError || !(err instanceof Error)) return err;
    return new VdiskError('ERR_HTTP', `${this.name}: ${what}: ${err.message.replace(/\s+$/, '')}`, { cause: err });
  }

  /** Run `attempt` with bounded retries for retryable failures. */
  private async withRetries<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    const started = Date.now();
    let delay = 100;
    for (let n = 0; ; n++) {
      try {
        return await attempt();
      } catch (err) {
        if (this.closed) throw new VdiskError('ECANCELED', `${this.name}: closed`);
        const code = (err as { code?: string }).code ?? '';
        const retryable =
          err instanceof RetryableError ||
          /^(ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|EAI_AGAIN|UND_ERR_SOCKET|UND_ERR_HEADERS_TIMEOUT|UND_ERR_BODY_TIMEOUT|UND_ERR_CONNECT_TIMEOUT|UND_ERR_CLOSED|ERR_SHORT_BODY)$/.test(code);
        if (!retryable) throw this.explainTls(err) ?? this.named(what, err);
        // A Retry-After is sat out no longer than an answer is waited for (--http-timeout), and never over 10 s.
        const retryAfter = err instanceof RetryableError ? err.retryAfterMs : undefined;
        const wait = retryAfter === undefined ? delay : Math.min(retryAfter, this.options.timeoutMs, MAX_RETRY_AFTER_MS);
        if (n >= this.options.retries || Date.now() - started + wait > this.options.retryBudgetMs) {
          throw new VdiskError('EIO', `${this.name}: ${what} failed after ${n + 1} attempts: ${(err as Error).message}`);
        }
        this.stats.retries++;
        trace('retry %s in %d ms: %s', what, wait, (err as Error).message);
        await sleep(wait, undefined, { signal: this.closing.signal }).catch(() => {
          throw new VdiskError('ECANCELED', `${this.name}: closed`);
        });
        delay = Math.min(delay * 2, 5_000);
      }
    }
  }

  /**
   * Fill `range` from the server: GETs of what has not arrived yet, retried
   * within the budget. A retry after a dropped connection asks only for the
   * rest, so bytes readers already have are never fetched twice.
   */
  private async fill(range: RangeBuffer): Promise<void> {
    try {
      await this.withRetries(`GET bytes=${range.start}-${range.end - 1}`, () => this.get(range));
    } catch (err) {
      range.fail(err as Error);
      this.ranges = this.ranges.filter((r) => r !== range);
    }
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
            if (settled) c.abort(new Error('deadline passed'));
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
            else settle(Object.assign(new Error(`short body: ${range.received - (start - range.start)} of ${end - start} bytes`), { code: 'ERR_SHORT_BODY' }));
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
    if (statusCode >= 500 || statusCode === 429) return new RetryableError(`HTTP ${statusCode}`, parseRetryAfter(h['retry-after']));
    if (statusCode === 416) return new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: ${what} is past the end: the remote image shrank`);
    return new VdiskError('ERR_HTTP', `${this.name}: HTTP ${statusCode} to ${what}`);
  }

  // -------------------------------------------------------------------------
  // Reads: ranges in flight, cache, readahead

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

  /** Where a new range from `pos` ends: at `want`, the image end, or the next range, whichever is first. */
  private gapEnd(pos: number, want: number): number {
    let end = Math.min(want, this.bytes);
    for (const r of this.ranges) if (r.start > pos && r.start < end) end = r.start;
    return end;
  }

  /** Bytes of ranges held in the cache or on their way. */
  get cachedBytes(): number {
    let n = 0;
    for (const r of this.ranges) n += r.length;
    return n;
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    const end = offset + bytes;
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
      const limit = Math.min(this.bytes, end + this.window);
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

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing.abort();
    // Every read has been answered by now: what is still on its way is readahead
    // nobody will use, and a slow server must not hold up the exit.
    await this.dispatcher.destroy().catch(() => undefined);
  }
}
