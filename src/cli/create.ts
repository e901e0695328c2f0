/** `vdisk create`: make a new image (raw, or qcow2 with an optional backing file). */
import type { Argv } from 'yargs';
import { FORMAT_NAMES, FORMATS, requireFormat } from '../drivers/registry.js';
import { createImage } from '../create.js';
import { VdiskError } from '../errors.js';
import { formatSize } from './util.js';
import { coerceWith, parseSize } from './numbers.js';
import { httpFromArgs, withHttpOptions, type HttpArgs } from './http-options.js';
import { displayName } from '../drivers/http/url.js';

export interface CreateArgs {
  file: string;
  size?: number;
  format: string;
  backing?: string;
  'backing-format'?: string;
  options: string[];
  force: boolean;
}

export function createOptions(y: Argv): Argv<CreateArgs & HttpArgs> {
  return withHttpOptions(y)
    .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
    .positional('size', { type: 'string', coerce: coerceWith('the size', (t) => parseSize(t, 'the size')), describe: 'virtual size: bytes, or with K/M/G/T (binary) suffix; defaults to the backing file\'s' })
    .option('format', { alias: 'f', type: 'string', choices: FORMAT_NAMES, default: 'raw', describe: 'image format' })
    .option('backing', { alias: 'b', type: 'string', describe: 'backing file (qcow2); a relative name is relative to the new image' })
    .option('backing-format', { alias: 'F', type: 'string', choices: FORMAT_NAMES, describe: 'format of the backing file, recorded in the image' })
    .option('options', {
      alias: 'o',
      type: 'string',
      array: true,
      nargs: 1,
      default: [],
      describe: FORMATS.flatMap((f) => (f.create.optionsHelp ? [f.create.optionsHelp] : [])).join('; '),
    })
    .option('force', { type: 'boolean', default: false, describe: 'replace an existing file' }) as unknown as Argv<CreateArgs & HttpArgs>;
}

export async function runCreate(args: CreateArgs & HttpArgs): Promise<void> {
  const entry = requireFormat(args.format, args.file);
  // -o is parsed here, before anything else (the library takes a format's options parsed, under its name);
  // a backing file on a format without one is the library's to refuse first.
  const formatOptions = args.backing !== undefined && !entry.create.backing ? {} : entry.create.parseOptions(args.options);
  const made = await createImage(args.file, {
    format: args.format,
    ...(args.size !== undefined ? { size: args.size } : {}),
    ...(args.backing !== undefined ? { backingFile: args.backing } : {}),
    ...(args['backing-format'] ? { backingFormat: args['backing-format'] } : {}),
    ...{ [entry.name]: formatOptions },
    overwrite: args.force,
    http: httpFromArgs(args),
  }).catch((err: unknown) => {
    if (err instanceof VdiskError && err.code === 'EEXIST') throw new VdiskError('EEXIST', `${err.message} (use --force to replace it)`);
    throw err;
  });
  const b = made.backingFile !== undefined ? ` backing_file=${displayName(made.backingFile)} backing_fmt=${made.backingFormat}` : '';
  process.stdout.write(`Formatting '${args.file}', fmt=${made.format} size=${made.size} (${formatSize(made.size)})${b}\n`);
}
