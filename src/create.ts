/**
 * Creating images (raw, or qcow2 with an optional backing file), for both
 * `vdisk create` and the library API: everything is checked before the
 * target is touched, and the new image appears whole or not at all.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { openImage, resolveBackingPath } from './drivers/chain.js';
import type { Qcow2CreateOptions } from './drivers/qcow2/create.js';
import { FORMAT_NAMES, FORMATS, formatEntry } from './drivers/registry.js';
import type { HttpOptions } from './drivers/http/index.js';
import { VdiskError } from './errors.js';
import { formatSize } from './size-text.js';

/** qcow2 creation options (QEMU's -o cluster_size=..., compat=..., ...). */
export type Qcow2FormatOptions = Omit<Qcow2CreateOptions, 'size' | 'backingFile' | 'backingFormat'>;

export interface CreateImageOptions {
  /** 'raw' (the default) or 'qcow2'. */
  format?: string;
  /** Virtual size in bytes; a qcow2 overlay takes its backing file's when absent. */
  size?: number;
  /** qcow2 only: the backing file (path or http(s) URL) as recorded; a relative name is relative to the new image. */
  backingFile?: string;
  /** Format of the backing file, recorded in the image; the backing file's own (probed) when absent. */
  backingFormat?: string;
  /** qcow2 only: cluster size, compat level, refcount width, preallocation, copy-on-read default. */
  qcow2?: Qcow2FormatOptions;
  /** Replace an existing file (atomically; other hard links keep the old contents). */
  overwrite?: boolean;
  /** For a backing file given as an http(s) URL: it is opened once to check it and learn its size. */
  http?: HttpOptions;
}

/** What was created. */
export interface CreatedImage {
  file: string;
  format: 'raw' | 'qcow2';
  size: number;
  backingFile?: string;
  backingFormat?: string;
}

/** Create an image file; fails with EEXIST if `file` exists (unless `overwrite`). */
export async function createImage(file: string, options: CreateImageOptions = {}): Promise<CreatedImage> {
  const name = options.format ?? 'raw';
  const overwrite = Boolean(options.overwrite);
  const entry = formatEntry(name);
  if (!entry) throw new VdiskError('ERR_IMAGE_FORMAT', `cannot create images of format '${name}' (supported: ${FORMAT_NAMES.join(', ')})`);
  // A format's own options are under its name (options.qcow2); another format's are a mistake.
  const byFormat = options as Record<string, unknown>;
  for (const other of FORMATS) {
    const given = byFormat[other.name] as Record<string, unknown> | undefined;
    if (other !== entry && given && Object.keys(given).length) throw new VdiskError('ERR_USAGE', `${name} images take no ${other.name} options`);
  }
  const formatOptions: Record<string, unknown> = { ...(byFormat[name] as Record<string, unknown> | undefined) };
  if (!entry.create.backing) {
    if (options.backingFile !== undefined) throw new VdiskError('ERR_USAGE', `${name} images have no backing file (a ${BACKING_FORMATS} overlay has)`);
    if (options.size === undefined) throw new VdiskError('ERR_USAGE', `a ${name} image needs a size`);
  }
  entry.create.validate(formatOptions, options.size ?? 0);
  if (!overwrite && (await exists(file))) throw existsError(file);
  let size = options.size;
  let backing: { name: string; format: string } | null = null;
  if (options.backingFile !== undefined) {
    // The backing file must open (with the format we record) and gives the default size.
    const node = await openImage(resolveBackingPath(file, options.backingFile), {
      readOnly: true,
      http: options.http ?? {},
      ...(options.backingFormat ? { format: options.backingFormat } : {}),
    });
    backing = { name: options.backingFile, format: options.backingFormat ?? node.driver.formatName };
    size ??= node.size();
    await node.close();
  }
  if (size === undefined) throw new VdiskError('ERR_USAGE', 'a size is needed (or a backing file to take it from)');
  const imageSize = size;
  await createAtomically(file, overwrite, async (tmp) => {
    await entry.create.create(tmp, imageSize, formatOptions, backing).catch((err: unknown) => {
      throw tooLarge(err, file, imageSize);
    });
  });
  return {
    file,
    format: name as CreatedImage['format'],
    size,
    ...(backing ? { backingFile: backing.name, backingFormat: backing.format } : {}),
  };
}

/** Formats that can record a backing file, for messages. */
const BACKING_FORMATS = FORMATS.filter((f) => f.create.backing)
  .map((f) => f.name)
  .join(', ');

/**
 * The new image is written to a temporary file next to the target and moved
 * into place only once it is complete: a failure at any point (a size the
 * filesystem refuses, a full disk, an error while writing metadata) leaves no
 * half-made file behind and, with overwrite, leaves the old file as it was.
 * Validating everything first would not be enough: EFBIG and ENOSPC only show
 * when writing. The price of overwrite is that the target becomes a new file
 * (as `cp` over it with --remove-destination would): other hard links to the
 * old one keep the old contents, and owner and mode are the creator's.
 */
async function createAtomically(target: string, overwrite: boolean, write: (tmp: string) => Promise<void>): Promise<void> {
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.vdisk-create-${randomBytes(6).toString('hex')}`);
  try {
    await write(tmp);
    if (overwrite) await fs.rename(tmp, target);
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

/** The CLI adds how to replace it (--force); the API's way is `overwrite`. */
function existsError(file: string): VdiskError {
  return new VdiskError('EEXIST', `${file} exists`);
}

/** A size the host filesystem cannot hold is the user's to fix: say so with a code. */
function tooLarge(err: unknown, file: string, size: number): unknown {
  if ((err as { code?: string }).code !== 'EFBIG') return err;
  return new VdiskError('EFBIG', `${file}: ${size} bytes (${formatSize(size)}) is more than the filesystem allows in one file`);
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
