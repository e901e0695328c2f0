/** `vdisk create`: make a new image (raw, or qcow2 with an optional backing file). */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { openImage, resolveBackingPath } from '../drivers/chain.js';
import { FORMATS, requireFormat } from '../drivers/registry.js';
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

/** Formats that can record a backing file, for help and messages. */
const BACKING_FORMATS = FORMATS.filter((f) => f.create.backing)
  .map((f) => f.name)
  .join(', ');

export function createOptions(y: Argv): Argv<CreateArgs & HttpArgs> {
  return withHttpOptions(y)
    .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
    .positional('size', { type: 'string', coerce: coerceWith('the size', (t) => parseSize(t, 'the size')), describe: 'virtual size: bytes, or with K/M/G/T (binary) suffix; defaults to the backing file\'s' })
    .option('format', { alias: 'f', type: 'string', choices: FORMAT_NAMES, default: 'raw', describe: 'image format' })
    .option('backing', { alias: 'b', type: 'string', describe: `backing file (${BACKING_FORMATS}); a relative name is relative to the new image` })
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
  const format = requireFormat(args.format, args.file);
  if (args.backing && !format.create.backing) throw new VdiskError('ERR_USAGE', `${format.name} images have no backing file (use -f ${BACKING_FORMATS})`);
  if (!format.create.backing && args.size === undefined) throw new VdiskError('ERR_USAGE', `a ${format.name} image needs a size`);
  const options = format.create.parseOptions(args.options, args.size ?? 0);
  if (!args.force && (await exists(args.file))) throw existsError(args.file);
  let size = args.size;
  let backing: { name: string; format: string } | null = null;
  if (args.backing) {
    // The backing file must open (with the format we record) and gives the default size.
    const node = await openImage(resolveBackingPath(args.file, args.backing), {
      readOnly: true,
      http: httpFromArgs(args),
      ...(args['backing-format'] ? { format: args['backing-format'] } : {}),
    });
    backing = { name: args.backing, format: args['backing-format'] ?? node.driver.formatName };
    size ??= node.size();
    await node.close();
  }
  if (size === undefined) throw new VdiskError('ERR_USAGE', 'a size is needed (or a backing file to take it from)');
  const imageSize = size;
  await createAtomically(args.file, args.force, async (tmp) => {
    await format.create.create(tmp, imageSize, options, backing).catch((err: unknown) => {
      throw tooLarge(err, args.file, imageSize);
    });
  });
  const b = backing ? ` backing_file=${displayName(backing.name)} backing_fmt=${backing.format}` : '';
  process.stdout.write(`Formatting '${args.file}', fmt=${format.name} size=${size} (${formatSize(size)})${b}\n`);
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
