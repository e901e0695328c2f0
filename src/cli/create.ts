/** `vdisk create`: make a new image (raw, or qcow2 with an optional backing file). */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Argv } from 'yargs';
import { openImage, resolveBackingPath } from '../block/open.js';
import { createQcow2, validateCreateOptions, type Qcow2CreateOptions } from '../drivers/qcow2/create.js';
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

/**
 * The new image is written to a temporary file next to the target and moved
 * into place only once it is complete: a failure at any point (a size the
 * filesystem refuses, a full disk, an error while writing metadata) leaves no
 * half-made file behind and, with --force, leaves the old file as it was.
 * Validating everything first would not be enough: EFBIG and ENOSPC only show
 * when writing. The price of --force is that the target becomes a new file
 * (as `cp` over it with --remove-destination would): other hard links to the
 * old one keep the old contents, and owner and mode are the creator's.
 */
async function createAtomically(target: string, force: boolean, write: (tmp: string) => Promise<void>): Promise<void> {
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.vdisk-create-${randomBytes(6).toString('hex')}`);
  try {
    await write(tmp);
    if (force) await fs.rename(tmp, target);
    else await linkNew(tmp, target);
  } finally {
    await fs.rm(tmp, { force: true });
  }
}

/** Put `tmp` at `target` unless something is there (checked atomically by link()). */
async function linkNew(tmp: string, target: string): Promise<void> {
  try {
    await fs.link(tmp, target);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'EEXIST') throw existsError(target);
    // A filesystem without hard links: claim the name, then move the image over it.
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS' && code !== 'EMLINK') throw err;
    await (await fs.open(target, 'wx').catch((e: unknown) => {
      throw (e as { code?: string }).code === 'EEXIST' ? existsError(target) : e;
    })).close();
    await fs.rename(tmp, target).catch(async (e: unknown) => {
      await fs.rm(target, { force: true }); // the empty file that claimed the name
      throw e;
    });
  }
}

function existsError(file: string): VdiskError {
  return new VdiskError('EEXIST', `${file} exists (use --force to replace it)`);
}

/** A size the host filesystem cannot hold is the user's to fix: say so with a code. */
function tooLarge(err: unknown, file: string, size: number): unknown {
  if ((err as { code?: string }).code !== 'EFBIG') return err;
  return new VdiskError('EFBIG', `${file}: ${size} bytes (${formatSize(size)}) is more than the filesystem allows in one file`);
}

export async function runCreate(args: CreateArgs & HttpArgs): Promise<void> {
  // Everything is checked before the target is touched: usage, sizes, options, the backing file.
  if (args.format === 'raw') {
    if (args.backing) throw new VdiskError('ERR_USAGE', 'raw images have no backing file (use -f qcow2)');
    if (args.options.length) throw new VdiskError('ERR_USAGE', 'raw images take no -o options');
    if (args.size === undefined) throw new VdiskError('ERR_USAGE', 'a raw image needs a size');
  }
  const options = args.format === 'qcow2' ? parseQcow2Options(args.options) : {};
  if (args.format === 'qcow2') validateCreateOptions({ ...options, size: args.size ?? 0 });
  if (!args.force && (await exists(args.file))) throw existsError(args.file);
  if (args.format === 'raw') {
    const size = args.size!;
    await createAtomically(args.file, args.force, async (tmp) => {
      const fh = await fs.open(tmp, 'wx');
      try {
        await fh.truncate(size).catch((err: unknown) => {
          throw tooLarge(err, args.file, size);
        });
      } finally {
        await fh.close();
      }
    });
    process.stdout.write(`Formatting '${args.file}', fmt=raw size=${size} (${formatSize(size)})\n`);
    return;
  }
  let size = args.size;
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
  const qcowSize = size;
  await createAtomically(args.file, args.force, async (tmp) => {
    await createQcow2(tmp, { ...options, size: qcowSize }, false).catch((err: unknown) => {
      throw tooLarge(err, args.file, qcowSize);
    });
  });
  const b = args.backing ? ` backing_file=${displayName(args.backing)} backing_fmt=${options.backingFormat}` : '';
  process.stdout.write(`Formatting '${args.file}', fmt=qcow2 size=${size} (${formatSize(size)})${b}\n`);
}

async function exists(file: string): Promise<boolean> {
  try {
    await fs.lstat(file);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return false;
    throw err;
  }
}
