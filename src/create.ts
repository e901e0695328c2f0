/**
 * Creating images (raw, or qcow2 with an optional backing file), for both
 * `vdisk create` and the library API: everything is checked before the
 * target is touched, and the new image appears whole or not at all.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { openImage, resolveBackingPath } from './drivers/chain.js';
import { createQcow2, validateCreateOptions, type Qcow2CreateOptions } from './drivers/qcow2/create.js';
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
  const format = options.format ?? 'raw';
  const overwrite = Boolean(options.overwrite);
  if (format === 'raw') {
    if (options.backingFile !== undefined) throw new VdiskError('ERR_USAGE', 'raw images have no backing file (a qcow2 overlay has)');
    if (options.qcow2 && Object.keys(options.qcow2).length) throw new VdiskError('ERR_USAGE', 'raw images take no qcow2 options');
    if (options.size === undefined) throw new VdiskError('ERR_USAGE', 'a raw image needs a size');
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new VdiskError('ERR_USAGE', `bad size ${options.size}`);
    const size = options.size;
    if (!overwrite && (await exists(file))) throw existsError(file);
    await createAtomically(file, overwrite, async (tmp) => {
      const fh = await fs.open(tmp, 'wx');
      try {
        await fh.truncate(size).catch((err: unknown) => {
          throw tooLarge(err, file, size);
        });
      } finally {
        await fh.close();
      }
    });
    return { file, format, size };
  }
  if (format !== 'qcow2') throw new VdiskError('ERR_IMAGE_FORMAT', `cannot create images of format '${format}' (supported: raw, qcow2)`);
  const qcow2: Omit<Qcow2CreateOptions, 'size'> = { ...options.qcow2 };
  validateCreateOptions({ ...qcow2, size: options.size ?? 0 });
  if (!overwrite && (await exists(file))) throw existsError(file);
  let size = options.size;
  if (options.backingFile !== undefined) {
    // The backing file must open (with the format we record) and gives the default size.
    const backing = await openImage(resolveBackingPath(file, options.backingFile), {
      readOnly: true,
      http: options.http ?? {},
      ...(options.backingFormat ? { format: options.backingFormat } : {}),
    });
    qcow2.backingFormat = options.backingFormat ?? backing.driver.formatName;
    size ??= backing.size();
    await backing.close();
    qcow2.backingFile = options.backingFile;
  }
  if (size === undefined) throw new VdiskError('ERR_USAGE', 'a size is needed (or a backing file to take it from)');
  const qcowSize = size;
  await createAtomically(file, overwrite, async (tmp) => {
    await createQcow2(tmp, { ...qcow2, size: qcowSize }, false).catch((err: unknown) => {
      throw tooLarge(err, file, qcowSize);
    });
  });
  return {
    file,
    format,
    size,
    ...(qcow2.backingFile !== undefined ? { backingFile: qcow2.backingFile, backingFormat: qcow2.backingFormat! } : {}),
  };
}

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
