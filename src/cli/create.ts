/** `vdisk create`: make a new image (raw, or qcow2 with an optional backing file). */
import fs from 'node:fs/promises';
import type { Argv } from 'yargs';
import { openImage, resolveBackingPath } from '../block/open.js';
import { createQcow2, type Qcow2CreateOptions } from '../drivers/qcow2/create.js';
import { VdiskError } from '../errors.js';
import { parseSize, formatSize } from './util.js';
import { httpFromArgs, withHttpOptions, type HttpArgs } from './http-options.js';
import { displayName } from '../drivers/http.js';

export interface CreateArgs {
  file: string;
  size?: string;
  format: 'raw' | 'qcow2';
  backing?: string;
  'backing-format'?: string;
  options: string[];
  force: boolean;
}

export function createOptions(y: Argv): Argv<CreateArgs & HttpArgs> {
  return withHttpOptions(y)
    .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
    .positional('size', { type: 'string', describe: 'virtual size: bytes, or with K/M/G/T (binary) suffix; defaults to the backing file\'s' })
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
        out.clusterSize = parseSize(value);
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
        out.refcountBits = Number(value);
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
  if (args.format === 'raw') {
    if (args.backing) throw new VdiskError('ERR_USAGE', 'raw images have no backing file (use -f qcow2)');
    if (args.options.length) throw new VdiskError('ERR_USAGE', 'raw images take no -o options');
    if (args.size === undefined) throw new VdiskError('ERR_USAGE', 'a raw image needs a size');
    const size = parseSize(args.size);
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(args.file, args.force ? 'w' : 'wx');
    } catch (err) {
      if ((err as { code?: string }).code === 'EEXIST') throw new VdiskError('EEXIST', `${args.file} exists (use --force to replace it)`);
      throw err;
    }
    try {
      await fh.truncate(size);
    } finally {
      await fh.close();
    }
    process.stdout.write(`Formatting '${args.file}', fmt=raw size=${size} (${formatSize(size)})\n`);
    return;
  }
  const options = parseQcow2Options(args.options);
  let size = args.size === undefined ? undefined : parseSize(args.size);
  if (args.backing) {
    // The backing file must open (with the format we record) and gives the default size.
    const backing = await openImage(resolveBackingPath(args.file, args.backing), {
      readOnly: true,
      http: httpFromArgs(args),
      ...(args['backing-format'] ? { format: args['backing-format'] } : {}),
    });
    const format = args['backing-format'] ?? backing.driver.formatName;
    size ??= backing.size();
    await backing.close();
    options.backingFile = args.backing;
    options.backingFormat = format;
  }
  if (size === undefined) throw new VdiskError('ERR_USAGE', 'a size is needed (or a backing file to take it from)');
  await createQcow2(args.file, { ...options, size }, args.force);
  const b = args.backing ? ` backing_file=${displayName(args.backing)} backing_fmt=${options.backingFormat}` : '';
  process.stdout.write(`Formatting '${args.file}', fmt=qcow2 size=${size} (${formatSize(size)})${b}\n`);
}
