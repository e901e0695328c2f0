/**
 * http(s): a read-only remote image over range requests (undici, one
 * keep-alive connection pool per image).
 *
 * - Size from HEAD, or from the Content-Range of a `Range: bytes=0-0` GET when
 *   HEAD is refused. A server that ignores Range is refused at open: vdisk never
 *   downloads a whole image by accident.
 * - Every range request carries the validator seen at open (If-Range with the
 *   ETag, else Last-Modified): a changed file answers 200 instead of 206 and the
 *   read fails with EIO. Old and new data are never mixed.
 * - Sequential reads grow a readahead window (reset by a seek); fetched ranges
 *   are kept in a small bounded cache; reads inside a range that is already on
 *   its way wait for it instead of fetching again.
 * - Connection errors, timeouts and 5xx/429 answers are retried with backoff
 *   (honouring Retry-After), bounded in count and time.
 * - Credentials in the URL become an Authorization header and never appear in
 *   messages or traces; neither does the query string.
 */
import fs from 'node:fs';
import { Agent, interceptors, type Dispatcher } from 'undici';
import type { BlockDriver } from '../block/driver.js';
import { VdiskError } from '../errors.js';
import { tracer } from '../trace.js';

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

/** The URL as it may be shown: no credentials, no query. */
export function displayUrl(url: string | URL): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '<bad url>';
  }
}

export function isHttpUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

class RetryableError extends Error {
  retryAfterMs: number | undefined;
  constructor(message: string, retryAfterMs?: number) {
    super(message);
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * A fetched range, kept as the buffers the body arrived in: assembling them
 * into one big buffer would cost a copy of every byte and garbage to collect.
 */
class Fetched {
  readonly start: number;
  readonly length: number;
  private readonly parts: Buffer[];
  /** ends[i]: offset (within the range) just past parts[i]. */
  private readonly ends: number[];

  constructor(start: number, parts: Buffer[]) {
    this.start = start;
    this.parts = parts;
    this.ends = [];
    let n = 0;
    for (const p of parts) this.ends.push((n += p.length));
    this.length = n;
  }

  /** Copy `n` bytes from range offset `from` into `dst` at `at`. */
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

interface Pending {
  start: number;
  end: number;
  promise: Promise<Fetched>;
}

function parseRetryAfter(value: string | string[] | undefined): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (!v) return undefined;
  const secs = Number(v);
  if (Number.isFinite(secs)) return Math.max(0, secs * 1000);
  const date = Date.parse(v);
  return Number.isFinite(date) ? Math.max(0, date - Date.now()) : undefined;
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
  private readonly cache: Fetched[] = [];
  private cacheBytes = 0;
  private readonly pending: Pending[] = [];
  private lastEnd = -1;
  private window: number;
  private closed = false;

  private constructor(url: URL, options: HttpOptions) {
    this.options = { ...DEFAULTS, ...options };
    this.headers = { 'user-agent': 'vdisk', ...(options.headers ?? {}) };
    // Credentials move from the URL into a header, so the URL can be shown.
    if (url.username || url.password) {
      const cred = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
      this.headers['authorization'] ??= `Basic ${Buffer.from(cred).toString('base64')}`;
      url.username = '';
      url.password = '';
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
    }).compose(interceptors.redirect({ maxRedirections: this.options.maxRedirects }));
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

  /** Size and validator; refuse servers that cannot do ranges. */
  private async probe(): Promise<void> {
    let acceptRanges = false;
    const head = await this.withRetries('HEAD', async () => {
      const res = await this.dispatcher.request({ origin: this.url.origin, path: this.path, method: 'HEAD', headers: this.headers });
      await res.body.dump();
      this.stats.requests++;
      if (res.statusCode >= 500 || res.statusCode === 429) throw new RetryableError(`HTTP ${res.statusCode}`, parseRetryAfter(res.headers['retry-after']));
      return res;
    });
    if (head.statusCode === 200) {
      const len = Number(header(head.headers, 'content-length'));
      if (Number.isSafeInteger(len) && len >= 0) this.bytes = len;
      acceptRanges = header(head.headers, 'accept-ranges')?.toLowerCase() === 'bytes';
      this.validator = header(head.headers, 'etag') ?? header(head.headers, 'last-modified') ?? null;
    } else if (head.statusCode === 404 || head.statusCode === 410) {
      throw new VdiskError('ERR_IMAGE_NOT_FOUND', `${this.name}: HTTP ${head.statusCode}`);
    } else if (head.statusCode === 401 || head.statusCode === 403) {
      throw new VdiskError('EACCES', `${this.name}: HTTP ${head.statusCode} (credentials? --header 'Authorization: ...')`);
    }
    if (!acceptRanges || head.statusCode !== 200) {
      // HEAD refused or silent about ranges: one byte tells both the size and whether ranges work.
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
      if (res.statusCode === 200) throw new VdiskError('ERR_HTTP_NO_RANGES', `${this.name}: the server ignores Range requests; vdisk will not download the whole image`);
      if (res.statusCode === 404 || res.statusCode === 410) throw new VdiskError('ERR_IMAGE_NOT_FOUND', `${this.name}: HTTP ${res.statusCode}`);
      if (res.statusCode !== 206) throw new VdiskError('ERR_HTTP', `${this.name}: HTTP ${res.statusCode} to a range request`);
      const total = /\/(\d+)\s*$/.exec(header(res.headers, 'content-range') ?? '')?.[1];
      if (total === undefined) throw new VdiskError('ERR_HTTP', `${this.name}: a 206 answer without the total size in Content-Range`);
      this.bytes = Number(total);
      this.validator ??= header(res.headers, 'etag') ?? header(res.headers, 'last-modified') ?? null;
    }
    if (!this.validator) trace('%s has neither ETag nor Last-Modified: changes cannot be detected', this.name);
    trace('open url=%s size=%d validator=%s', this.name, this.bytes, this.validator);
  }

  private get path(): string {
    return `${this.url.pathname}${this.url.search}`;
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
        if (!retryable) throw err;
        const wait = Math.min(err instanceof RetryableError && err.retryAfterMs !== undefined ? err.retryAfterMs : delay, 10_000);
        if (n >= this.options.retries || Date.now() - started + wait > this.options.retryBudgetMs) {
          throw new VdiskError('EIO', `${this.name}: ${what} failed after ${n + 1} attempts: ${(err as Error).message}`);
        }
        this.stats.retries++;
        trace('retry %s in %d ms: %s', what, wait, (err as Error).message);
        await new Promise((resolve) => setTimeout(resolve, wait));
        delay = Math.min(delay * 2, 5_000);
      }
    }
  }

  /** GET [start, end) with the validator; exactly those bytes, or an error. */
  private fetchRange(start: number, end: number): Promise<Fetched> {
    const what = `GET bytes=${start}-${end - 1}`;
    return this.withRetries(what, async () => {
      const headers: Record<string, string> = { ...this.headers, range: `bytes=${start}-${end - 1}` };
      if (this.validator) headers['if-range'] = this.validator;
      const res = await this.dispatcher.request({ origin: this.url.origin, path: this.path, method: 'GET', headers });
      this.stats.requests++;
      if (res.statusCode === 206) {
        const range = /bytes (\d+)-(\d+)\/(\d+|\*)/.exec(header(res.headers, 'content-range') ?? '');
        if (!range || Number(range[1]) !== start || Number(range[2]) !== end - 1) {
          await res.body.dump({ limit: 0 }).catch(() => undefined);
          throw new VdiskError('EIO', `${this.name}: asked for ${what.slice(4)}, got Content-Range '${header(res.headers, 'content-range')}'`);
        }
        // If-Range already asks for this; a server that ignores it is caught here.
        const etag = header(res.headers, 'etag');
        if (etag && this.validator?.startsWith('"') && etag !== this.validator) {
          await res.body.dump({ limit: 0 }).catch(() => undefined);
          throw new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: the remote image changed since it was opened (ETag ${this.validator} is now ${etag})`);
        }
        const parts: Buffer[] = [];
        let got = 0;
        for await (const chunk of res.body) {
          const b = chunk as Buffer;
          got += b.length;
          if (got > end - start) throw new VdiskError('EIO', `${this.name}: more data than asked for in ${what}`);
          parts.push(b);
        }
        if (got !== end - start) throw Object.assign(new Error(`short body: ${got} of ${end - start} bytes`), { code: 'ERR_SHORT_BODY' });
        this.stats.bytesFetched += got;
        return new Fetched(start, parts);
      }
      // A 200 to a range request is never the range: with If-Range it means the file changed.
      await res.body.dump({ limit: 0 }).catch(() => undefined);
      if (res.statusCode === 200 || res.statusCode === 412) {
        throw new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: the remote image changed since it was opened (validator ${this.validator ?? 'none'}); refusing to mix old and new data`);
      }
      if (res.statusCode >= 500 || res.statusCode === 429) throw new RetryableError(`HTTP ${res.statusCode}`, parseRetryAfter(res.headers['retry-after']));
      if (res.statusCode === 416) throw new VdiskError('ERR_REMOTE_CHANGED', `${this.name}: ${what} is past the end: the remote image shrank`);
      throw new VdiskError('ERR_HTTP', `${this.name}: HTTP ${res.statusCode} to ${what}`);
    });
  }

  // -------------------------------------------------------------------------
  // Reads: cache, coalescing, readahead

  private cached(offset: number, bytes: number): Fetched | undefined {
    return this.cache.find((c) => c.start <= offset && offset + bytes <= c.start + c.length);
  }

  private remember(chunk: Fetched): void {
    this.cache.push(chunk);
    this.cacheBytes += chunk.length;
    while (this.cacheBytes > this.options.cacheBytes && this.cache.length > 1) this.cacheBytes -= this.cache.shift()!.length;
  }

  /** Start (or join) a fetch of [start, end); the result lands in the cache. */
  private fetch(start: number, end: number): Promise<Fetched> {
    const existing = this.pending.find((p) => p.start <= start && end <= p.end);
    if (existing) return existing.promise;
    const p: Pending = {
      start,
      end,
      promise: this.fetchRange(start, end).then((data) => {
        this.remember(data);
        return data;
      }),
    };
    this.pending.push(p);
    const done = () => {
      const i = this.pending.indexOf(p);
      if (i >= 0) this.pending.splice(i, 1);
    };
    p.promise.then(done, done);
    return p.promise;
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    const sequential = offset === this.lastEnd;
    this.lastEnd = offset + bytes;
    // The window doubles while reads stay sequential and starts over after a seek.
    this.window = sequential ? Math.min(this.window * 2, this.options.readaheadMaxBytes) : this.options.readaheadMinBytes;
    let pos = offset;
    // Copy n bytes of a fetched range into the iov at pos.
    const copyOut = (data: Fetched, n: number) => {
      let src = pos - data.start;
      let left = n;
      let logical = pos - offset;
      for (const b of iov) {
        if (left === 0) break;
        if (logical >= b.length) {
          logical -= b.length;
          continue;
        }
        const k = Math.min(b.length - logical, left);
        data.copyTo(b, logical, src, k);
        src += k;
        left -= k;
        logical = 0;
      }
      pos += n;
    };
    while (pos < offset + bytes) {
      const want = offset + bytes - pos;
      const hit = this.cached(pos, 1);
      if (hit) {
        copyOut(hit, Math.min(want, hit.start + hit.length - pos));
        continue;
      }
      const inflight = this.pending.find((p) => p.start <= pos && pos < p.end);
      if (inflight) {
        const data = await inflight.promise;
        copyOut(data, Math.min(want, inflight.end - pos));
        continue;
      }
      // Fetch what is asked, stretched to the readahead window, not past an in-flight range or the end.
      let end = Math.min(this.bytes, pos + Math.max(want, this.window));
      for (const p of this.pending) if (p.start > pos && p.start < end) end = p.start;
      const data = await this.fetch(pos, end);
      copyOut(data, Math.min(want, end - pos));
    }
    // Keep the pipe full: on a sequential stream, the next window is fetched while this one is used.
    if (sequential && this.lastEnd < this.bytes) {
      const next = this.lastEnd;
      const covered = this.cached(next, 1) || this.pending.some((p) => p.start <= next && next < p.end);
      if (!covered) this.fetch(next, Math.min(this.bytes, next + this.window)).catch(() => undefined);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.dispatcher.close().catch(() => undefined);
  }
}
