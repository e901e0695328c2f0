/**
 * Numbers typed by people, parsed strictly with their unit and range: sizes
 * ("512M", "1.5G"), whole numbers and seconds. A bad one is ERR_USAGE naming
 * what it was for. Used by the command line (cli/numbers.ts, at option-parsing
 * time) and by format create options (-o cluster_size=64k), which the library
 * takes as text too.
 */
import { VdiskError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

export interface Range {
  min: number;
  max: number;
}

function usage(what: string, text: string, rule: string): VdiskError {
  return new VdiskError('ERR_USAGE', `${what} takes ${rule}, not '${text}'`);
}

function inRange(what: string, text: string, value: number, range: Range, show: (n: number) => string): number {
  if (value < range.min || value > range.max) throw usage(what, text, `${show(range.min)} to ${show(range.max)}`);
  return value;
}

/**
 * "10G", "512M", "1.5GiB", "4096" -> bytes (binary units, as qemu-img). A
 * fraction needs a unit and must come to whole bytes: "1.5" is refused rather
 * than rounded to a 2-byte disk.
 */
export function parseSize(text: string, what = 'a size', range: Range = { min: 0, max: Number.MAX_SAFE_INTEGER }): number {
  const m = /^\s*(\d+)(?:\.(\d+))?\s*([kmgtpeb]?)(?:i?b)?\s*$/i.exec(text);
  const unit = UNITS[(m?.[3] ?? '').toLowerCase()];
  if (!m || unit === undefined) throw usage(what, text, 'bytes or a size with a unit (examples: 1073741824, 512M, 1.5G)');
  // Whole part and fraction apart, so that 0.5K is exactly 512 and 1.0001K is refused.
  const fraction = m[2] ?? '';
  const scale = 10 ** fraction.length;
  const numerator = BigInt(m[1]!) * BigInt(scale) + BigInt(fraction || '0');
  const scaled = numerator * BigInt(unit);
  if (scaled % BigInt(scale) !== 0n) throw usage(what, text, 'a whole number of bytes');
  const bytes = scaled / BigInt(scale);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw usage(what, text, `at most ${Number.MAX_SAFE_INTEGER} bytes`);
  return inRange(what, text, Number(bytes), range, (n) => `${n} bytes`);
}

/** A whole number in a range: "5" -> 5; "-1", "abc", "2.5", "1e3" are refused. */
export function parseInteger(text: string, what: string, range: Range): number {
  if (!/^\s*\d+\s*$/.test(text)) throw usage(what, text, `a whole number from ${range.min} to ${range.max}`);
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw usage(what, text, `a whole number from ${range.min} to ${range.max}`);
  return inRange(what, text, n, range, (v) => `${v}`);
}

/** Seconds, with a fraction if wanted ("0.5"), strictly above zero and at most `max`. */
export function parseSeconds(text: string, what: string, max: number): number {
  const rule = `seconds, more than 0 and at most ${max}`;
  if (!/^\s*\d+(?:\.\d+)?\s*$/.test(text)) throw usage(what, text, rule);
  const s = Number(text);
  if (!(s > 0) || s > max) throw usage(what, text, rule);
  return s;
}
