/** `vdisk create`: make a new image (raw, or qcow2 with an optional backing file). */
import type { Argv } from 'yargs';
import { createImage } from '../create.js';
import type { Qcow2CreateOptions } from '../drivers/qcow2/create.js';
import { VdiskError } from '../errors.js';
import { formatSize } from './util.js';
import { coerceWith, parseInteger, parseSize } from './numbers.js';
import { httpFromArgs, withHttpOptions, type HttpArgs } from './http-options.js';
import { displayName } from '../drivers/http/url.js';

export interface CreateArgs {
  file: string;
  size?: number;
  format: 'raw' | 'qcow2';
  backing?: string;
  'backing-format'?: string;
  options: string[];
  force: boolean;
}

export function createOptions(y: Argv): Argv<CreateArgs & HttpArgs> {
  return withHttpOptions(y)
    .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
    .positional('size', { type: 'string', coerce: coerceWith('the size', (t) => parseSize(t, 'the size')), describe: 'virtual size: bytes, or with K/M/G/T (binary) suffix; defaults to the backing file\'s' })
    .option('format', { alias: 'f', choices: ['raw', 'qcow2'] as const, default: 'raw' as const, describe: 'image format' })
    .option('backing', { alias: 'b', type: 'string', describe: 'backing file (qcow2); a relative name is relative to the new image' })
    .option('backing-format', { alias: 'F', type: 'string', choices: ['raw', 'qcow2'], describe: 'format of the backing file, recorded in the image' })
    .option('options', {
      alias: 'o',
      type: 'string',
      array: true,
      nargs: 1,
      default: [],
      describe: 'qcow2: cluster_size=64k,compat=1.1|0.10,extended_l2=on,refcount_bits=16,lazy_refcounts=on,preallocation=metadata,copy_on_read=on',
    })
    .option('force', { type: 'boolean', default: false, describe: 'replace an existing file' }) as unknown as Argv<CreateArgs & HttpArgs>;
}

function onOff(key: string, v: string): boolean {
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  throw new VdiskError('ERR_USAGE', `-o ${key}= takes on or off, not '${v}'`);
}

export function parseQcow2Options(list: string[]): Omit<Qcow2CreateOptions, 'size'> {
  const out: Omit<Qcow2CreateOptions, 'size'> = {};
  for (const item of list.flatMap((s) => s.split(',')).filter(Boolean)) {
    const [key, value = ''] = item.split('=', 2) as [string, string?];
    switch (key) {
      case 'cluster_size':
        out.clusterSize = parseSize(value, '-o cluster_size=');
        break;
      case 'compat':
        if (value === '0.10' || value === 'v2') out.compat = '0.10';
        else if (value === '1.1' || value === 'v3') out.compat = '1.1';
        else throw new VdiskError('ERR_USAGE', `-o compat= takes 0.10 or 1.1, not '${value}'`);
        break;
      case 'extended_l2':
        out.extendedL2 = onOff(key, value);
        break;
      case 'refcount_bits':
        out.refcountBits = parseInteger(value, '-o refcount_bits=', { min: 1, max: 64 });
        break;
      case 'lazy_refcounts':
        out.lazyRefcounts = onOff(key, value);
        break;
      case 'copy_on_read':
        out.copyOnRead = onOff(key, value);
        break;
      case 'preallocation':
        if (value !== 'off' && value !== 'metadata') throw new VdiskError('ERR_USAGE', `-o preallocation= takes off or metadata, not '${value}'`);
        out.preallocation = value;
        break;
      default:
        throw new VdiskError('ERR_USAGE', `unknown -o option '${key}'`);
    }
  }
  return out;
}

export async function runCreate(args: CreateArgs & HttpArgs): Promise<void> {
  // Usage the library cannot see (it takes qcow2 options already parsed) is checked here, before anything else.
  if (args.format === 'raw' && args.options.length && args.backing === undefined) throw new VdiskError('ERR_USAGE', 'raw images take no -o options');
  const made = await createImage(args.file, {
    format: args.format,
    ...(args.size !== undefined ? { size: args.size } : {}),
    ...(args.backing !== undefined ? { backingFile: args.backing } : {}),
    ...(args['backing-format'] ? { backingFormat: args['backing-format'] } : {}),
    ...(args.format === 'qcow2' ? { qcow2: parseQcow2Options(args.options) } : {}),
    overwrite: args.force,
    http: httpFromArgs(args),
  }).catch((err: unknown) => {
    if (err instanceof VdiskError && err.code === 'EEXIST') throw new VdiskError('EEXIST', `${err.message} (use --force to replace it)`);
    throw err;
  });
  const b = made.backingFile !== undefined ? ` backing_file=${displayName(made.backingFile)} backing_fmt=${made.backingFormat}` : '';
  process.stdout.write(`Formatting '${args.file}', fmt=${made.format} size=${made.size} (${formatSize(made.size)})${b}\n`);
}
