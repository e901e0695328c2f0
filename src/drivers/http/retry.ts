/**
 * When a failed request is tried again, and how long any request may take:
 * connection errors, timeouts and 5xx/429 answers are retried with backoff
 * (honouring Retry-After up to --http-timeout or 10 s), bounded in count and
 * in time; every range GET has a deadline for its last byte (--http-timeout
 * plus the bytes at 64 KiB/s), so a server trickling bytes cannot hold a read
 * longer than that.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import { explainTls } from './client.js';

const trace = tracer('http');

/**
 * The longest Retry-After vdisk sits out (and never longer than --http-timeout).
 * A reader is waiting (a process in read(2) on a FUSE file), so a server
 * asking for an hour gets ten seconds, and the retry budget decides the rest.
 */
export const MAX_RETRY_AFTER_MS = 10_000;

/** Retry-After (RFC 9110 10.2.3: delay-seconds or an HTTP-date) in ms, capped; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | undefined, now = Date.now()): number | undefined {
  const v = value?.trim();
  if (!v) return undefined;
  // Number() of a long digit string is a huge double or Infinity: the cap takes both.
  if (/^\d+$/.test(v)) return Math.min(Number(v) * 1000, MAX_RETRY_AFTER_MS);
  // An HTTP-date starts with a day name (IMF-fixdate, RFC 850, asctime); Date.parse alone would read '1.5' as a year.
  if (!/^[a-z]{3}/i.test(v)) return undefined;
  const date = Date.parse(v);
  return Number.isFinite(date) ? Math.min(Math.max(0, date - now), MAX_RETRY_AFTER_MS) : undefined;
}

/**
 * The slowest average rate a range request may arrive at. --http-timeout only
 * bounds the gaps between body chunks: a server sending a byte a second holds
 * a read for days without ever being idle that long. 64 KiB/s (512 kbit/s) is
 * slow enough for a poor link (a request that misses it is retried for what is
 * still missing, so progress is kept) and makes a trickle fail in seconds.
 */
export const MIN_RANGE_BYTES_PER_SEC = 64 * 1024;

/**
 * The whole time one GET of `bytes` may take, from sending it to its last
 * byte: --http-timeout for the answer to start, plus the bytes at the minimum rate.
 */
export function rangeDeadlineMs(bytes: number, timeoutMs: number): number {
  // setTimeout fires at once for anything above 2^31-1 ms (24.8 days).
  return Math.min(timeoutMs + Math.ceil((bytes * 1000) / MIN_RANGE_BYTES_PER_SEC), 2 ** 31 - 1);
}

/**
 * A failure worth another attempt (a 5xx or 429 answer, a short body, a missed
 * deadline), with the wait the server asked for, if any. It never leaves the
 * driver: the last attempt's failure becomes EIO.
 */
export class RetryableError extends VdiskError {
  readonly retryAfterMs: number | undefined;
  constructor(message: string, retryAfterMs?: number) {
    super('EIO', message);
    this.retryAfterMs = retryAfterMs;
  }
}

/** Error codes of undici and the socket that say "try again". */
const RETRYABLE_CODES = /^(ECONNRESET|ECONNREFUSED|EPIPE|ETIMEDOUT|EAI_AGAIN|UND_ERR_SOCKET|UND_ERR_HEADERS_TIMEOUT|UND_ERR_BODY_TIMEOUT|UND_ERR_CONNECT_TIMEOUT|UND_ERR_CLOSED)$/;

export interface RetryPolicy {
  /** Attempts after the first. */
  retries: number;
  /** Give up after this long, retries included. */
  retryBudgetMs: number;
  /** --http-timeout: also the longest Retry-After sat out. */
  timeoutMs: number;
}

/**
 * Ours as they are; any other failure (a name that does not resolve, TLS
 * spoken to a plain-http port, undici's own) as ERR_HTTP naming the image:
 * the raw error's code is not in the error table and its message may not
 * say which URL failed (an OpenSSL line, 'getaddrinfo ENOTFOUND host').
 */
function named(name: string, what: string, err: unknown): unknown {
  if (err instanceof VdiskError || !(err instanceof Error)) return err;
  return new VdiskError('ERR_HTTP', `${name}: ${what}: ${err.message.replace(/\s+$/, '')}`, { cause: err });
}

/** Runs attempts under one policy for one image, until close() cancels the waits. */
export class Retrier {
  private readonly name: string;
  private readonly policy: RetryPolicy;
  private readonly stats: { retries: number };
  private closed = false;
  /** Aborted by close(): a retry waiting out its backoff must not hold the process up. */
  private readonly closing = new AbortController();

  constructor(name: string, policy: RetryPolicy, stats: { retries: number }) {
    this.name = name;
    this.policy = policy;
    this.stats = stats;
  }

  close(): void {
    this.closed = true;
    this.closing.abort();
  }

  /** Run `attempt` with bounded retries for retryable failures. */
  async run<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    const started = Date.now();
    let delay = 100;
    for (let n = 0; ; n++) {
      try {
        return await attempt();
      } catch (err) {
        if (this.closed) throw new VdiskError('ECANCELED', `${this.name}: closed`);
        const retryable = err instanceof RetryableError || RETRYABLE_CODES.test((err as { code?: string }).code ?? '');
        if (!retryable) throw explainTls(this.name, err) ?? named(this.name, what, err);
        // A Retry-After is sat out no longer than an answer is waited for (--http-timeout), and never over 10 s.
        const retryAfter = err instanceof RetryableError ? err.retryAfterMs : undefined;
        const wait = retryAfter === undefined ? delay : Math.min(retryAfter, this.policy.timeoutMs, MAX_RETRY_AFTER_MS);
        if (n >= this.policy.retries || Date.now() - started + wait > this.policy.retryBudgetMs) {
          throw new VdiskError('EIO', `${this.name}: ${what} failed after ${n + 1} attempts: ${(err as Error).message}`, { cause: err });
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
}
