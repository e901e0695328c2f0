/**
 * Numbers an HTTP server hands us, checked before use: a server is not
 * trusted to send sizes that fit in a double, lengths that match what it
 * claims to send, or waits we should sit out. And the one number we derive
 * ourselves: how long a range request may take in all.
 */

/** Decimal digits as a number; null unless they are a safe integer (10^30 would lose its last digits). */
export function safeInteger(digits: string): number | null {
  if (!/^\d{1,16}$/.test(digits)) return null;
  const n = Number(digits);
  return Number.isSafeInteger(n) ? n : null;
}

export interface ContentRange {
  start: number;
  /** Inclusive, as on the wire. */
  end: number;
  /** null for `*` (size unknown). */
  total: number | null;
}

/** `bytes START-END/TOTAL`, every number a safe integer and END inside TOTAL; null for anything else. */
export function parseContentRange(value: string | undefined): ContentRange | null {
  const m = /^\s*bytes\s+(\d+)-(\d+)\/(\d+|\*)\s*$/i.exec(value ?? '');
  if (!m) return null;
  const start = safeInteger(m[1]!);
  const end = safeInteger(m[2]!);
  const total = m[3] === '*' ? null : safeInteger(m[3]!);
  if (start === null || end === null || end < start) return null;
  if (m[3] !== '*' && (total === null || end >= total)) return null;
  return { start, end, total };
}

/** Whether a Content-Length header (absent with chunked bodies) says `bytes`. */
export function contentLengthIs(value: string | undefined, bytes: number): boolean {
  return value === undefined || safeInteger(value.trim()) === bytes;
}

/**
 * The longest Retry-After vdisk sits out (and never longer than --http-timeout).
 * A reader is waiting (a process in read(2) on a FUSE file), so a server
 * asking for an hour gets ten seconds, and the retry budget decides the rest.
 */
export const MAX_RETRY_AFTER_MS = 10_000;

/** Retry-After (RFC 9110 10.2.3: delay-seconds or an HTTP-date) in ms, capped; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const v = (Array.isArray(value) ? value[0] : value)?.trim();
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

/** A header value from a server, safe to quote in a one-line message. */
export function quoteHeader(value: string | undefined): string {
  if (value === undefined) return '(none)';
  const v = value.length > 60 ? `${value.slice(0, 60)}...` : value;
  return `'${v.replace(/[^\x20-\x7e]/g, '?')}'`;
}
