/**
 * Numbers and headers an HTTP server hands us, checked before use: a server
 * is not trusted to send sizes that fit in a double, or lengths that match
 * what it claims to send. (Waits it asks for are the retry policy's: retry.ts.)
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

/** A header value from a server, safe to quote in a one-line message. */
export function quoteHeader(value: string | undefined): string {
  if (value === undefined) return '(none)';
  const v = value.length > 60 ? `${value.slice(0, 60)}...` : value;
  return `'${v.replace(/[^\x20-\x7e]/g, '?')}'`;
}

/** One header's value (the first, if the server sent it more than once). */
export function header(h: Record<string, string | string[] | undefined>, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v[0] : v;
}
