/**
 * Every number the command line takes, parsed once, with its unit and range.
 * A bad one is a usage error (exit 2) raised while yargs parses the options,
 * so no command opens, creates or truncates anything before its numbers are
 * known to be good. yargs' own `type: 'number'` is not used: it turns 'abc'
 * into NaN and '1e12' into a number nobody meant.
 */
import { VdiskError } from '../errors.js';
import { parseInteger, parseSeconds, parseSize } from '../number-text.js';

export { parseInteger, parseSeconds, parseSize, type Range } from '../number-text.js';

/**
 * A yargs `coerce` for an option parsed by `parse`. yargs hands over what was
 * typed (a string, as the option is declared type 'string'), or the default;
 * an option given twice is refused rather than silently taking one of them.
 */
export function coerceWith<T>(what: string, parse: (text: string) => T): (value: unknown) => T | undefined {
  return (value: unknown) => {
    if (value === undefined) return undefined;
    if (Array.isArray(value)) throw new VdiskError('ERR_USAGE', `${what} is given more than once`);
    return parse(String(value));
  };
}

/** The numeric options of the command line: one place for their units and ranges. */
export const OPTION_NUMBERS = {
  /** Kernel readahead of the mount, KiB: 0 (none) to 1 GiB. */
  readaheadKiB: (text: string) => parseInteger(text, '--readahead-kb', { min: 0, max: 1024 * 1024 }),
  /** A generous day: longer is a typo, and 0 would fail every request at once. */
  httpTimeoutSeconds: (text: string) => parseSeconds(text, '--http-timeout', 86_400),
  httpRetries: (text: string) => parseInteger(text, '--http-retries', { min: 0, max: 100 }),
  /** qcow2's L2 cache, 512 B to 4 GiB (the cache keeps at least 4 tables whatever it is given; the crash tests use the smallest). */
  l2CacheBytes: (text: string) => parseSize(text, '--l2-cache-size', { min: 512, max: 4 * 2 ** 30 }),
  /** A job's rate limit, bytes/s (0: none). */
  rateLimit: (text: string) => parseSize(text, '--rate-limit'),
} as const;
