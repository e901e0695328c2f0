/** Checks on the mountpoint before mounting, and the kernel readahead of the mount. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { constants as fsConstants } from 'node:fs';
import { VdiskError } from '../errors.js';

/** Mount points from /proc/self/mountinfo, with the kernel's octal escapes undone. */
export async function mountedPaths(): Promise<Map<string, string>> {
  const text = await fs.readFile('/proc/self/mountinfo', 'utf8');
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (fields.length < 5 || dash < 0) continue;
    const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    out.set(unescape(fields[4]!), fields[dash + 1] ?? '');
  }
  return out;
}

/** The absolute mountpoint, once it is known to be a regular file that is free to mount on. */
export async function checkMountpoint(mountpoint: string): Promise<string> {
  // Check for a mount before touching the file: a dead FUSE mount answers ENOTCONN to everything.
  let real = path.resolve(mountpoint);
  try {
    real = path.join(await fs.realpath(path.dirname(real)), path.basename(real));
  } catch {
    throw new VdiskError('ERR_MOUNTPOINT', `the directory of mountpoint ${mountpoint} does not exist`);
  }
  const mounted = await mountedPaths();
  if (mounted.has(real)) throw new VdiskError('ERR_ALREADY_MOUNTED', `${mountpoint} is already mounted (${mounted.get(real)}); vdisk unmount it first`);
  let st;
  try {
    real = await fs.realpath(real);
    st = await fs.stat(real);
  } catch {
    throw new VdiskError('ERR_MOUNTPOINT', `mountpoint ${mountpoint} does not exist (create an empty file there first)`);
  }
  if (!st.isFile()) throw new VdiskError('ERR_MOUNTPOINT', `mountpoint ${mountpoint} is not a regular file (vdisk mounts the disk as one file)`);
  try {
    await fs.access('/dev/fuse', fsConstants.R_OK | fsConstants.W_OK);
  } catch {
    throw new VdiskError('ERR_NO_FUSE', '/dev/fuse is missing or not accessible (load the fuse module; in a container pass --device /dev/fuse)');
  }
  return real;
}

/**
 * FUSE's INIT cannot raise readahead above the kernel default (128 KiB), so
 * buffered sequential reads would reach vdisk in 128 KiB pieces. The mount's
 * backing-dev-info can be raised through sysfs (root only).
 */
export async function setReadahead(mountpoint: string, kib: number): Promise<void> {
  const dev = (await fs.stat(mountpoint, { bigint: true })).dev;
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  await fs.writeFile(`/sys/class/bdi/${major}:${minor}/read_ahead_kb`, String(kib));
}
