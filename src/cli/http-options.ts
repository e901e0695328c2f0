/** Command-line options for images read over HTTP(S), shared by the commands that open images. */
import type { Argv } from 'yargs';
import type { OpenOptions } from '../drivers/chain.js';
import type { HttpOptions } from '../drivers/http/index.js';
import { VdiskError } from '../errors.js';
import { OPTION_NUMBERS, coerceWith } from './numbers.js';

export interface HttpArgs {
  header: string[];
  'ca-file'?: string;
  insecure: boolean;
  'http-timeout': number;
  'http-retries': number;
}

export function withHttpOptions<T>(y: Argv<T>): Argv<T & HttpArgs> {
  return y
    .option('header', { alias: 'H', type: 'string', array: true, nargs: 1, default: [], describe: "HTTP header for remote images, e.g. 'Authorization: Bearer ...' (repeatable)" })
    .option('ca-file', { type: 'string', describe: 'PEM file of CA certificates to trust for https' })
    .option('insecure', { type: 'boolean', default: false, describe: 'accept any TLS certificate (testing only)' })
    .option('http-timeout', { type: 'string', default: 30, coerce: coerceWith('--http-timeout', OPTION_NUMBERS.httpTimeoutSeconds), describe: 'seconds to wait for an HTTP answer (headers, and between body chunks); a whole range GET may take this plus 1 s per 64 KiB' })
    .option('http-retries', { type: 'string', default: 5, coerce: coerceWith('--http-retries', OPTION_NUMBERS.httpRetries), describe: 'retries of a failed range request (connection errors, timeouts, 5xx)' }) as unknown as Argv<T & HttpArgs>;
}

export function httpFromArgs(args: HttpArgs): HttpOptions {
  const headers: Record<string, string> = {};
  for (const h of args.header) {
    const i = h.indexOf(':');
    // Never quote it: the value is often a credential ('Bearer ...' without its 'Authorization:').
    if (i <= 0) throw new VdiskError('ERR_USAGE', `--header takes 'Name: value'; one of them has no name before a ':'`);
    headers[h.slice(0, i).trim().toLowerCase()] = h.slice(i + 1).trim();
  }
  const out: HttpOptions = { headers, insecure: args.insecure, timeoutMs: Math.max(1, Math.round(args['http-timeout'] * 1000)), retries: args['http-retries'] };
  if (args['ca-file']) out.caFile = args['ca-file'];
  return out;
}

/** What every command that opens an image takes from its arguments: formats and HTTP settings. */
export function imageOpenOptions(args: HttpArgs & { format?: string; 'backing-format'?: string }): OpenOptions {
  return { format: args.format, backingFormat: args['backing-format'], http: httpFromArgs(args) };
}
