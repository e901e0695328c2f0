/** Checks on the mountpoint before mounting, and the kernel readahead of the mount. */
import fs from 'node:fs/promises';
import path from 'node:path';
import fsSync, { constants as fsConstants } from 'node:fs';
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

/**
 * The path a mountpoint has in /proc/self/mountinfo: its directory resolved,
 * its last component as given (never followed: a mount is on the file itself).
 * `vdisk mount` and `vdisk unmount` both name a mount this way, and both refuse
 * another user's symlink on the way (resolveTrustedDir): through one, root's
 * `vdisk unmount /tmp/pub/d/disk` would end whatever mount the link's owner chose.
 */
export async function mountinfoPath(mountpoint: string): Promise<string> {
  const abs = path.resolve(mountpoint);
  return path.join(await resolveTrustedDir(mountpoint, path.dirname(abs)), path.basename(abs));
}

/** Linux's limit on symlinks followed in one lookup (ELOOP past it). */
const MAX_SYMLINKS = 40;

/**
 * Resolve the directory of a mountpoint like realpath(), refusing a symlink on
 * the way that belongs to neither root nor the mounting user: its owner could
 * point it anywhere, and root would mount over whatever it names (the policy of
 * the kernel's fs.protected_symlinks, applied to every directory).
 */
async function resolveTrustedDir(mountpoint: string, dir: string): Promise<string> {
  const uid = process.getuid?.() ?? 0;
  const pending = dir.split('/').filter(Boolean);
  let resolved = '/';
  let links = 0;
  while (pending.length) {
    const name = pending.shift()!;
    if (name === '.') continue;
    if (name === '..') {
      resolved = path.dirname(resolved);
      continue;
    }
    const next = path.join(resolved, name);
    let st;
    try {
      st = await fs.lstat(next);
    } catch {
      throw new VdiskError('ERR_MOUNTPOINT', `the directory of mountpoint ${mountpoint} does not exist`);
    }
    if (!st.isSymbolicLink()) {
      resolved = next;
      continue;
    }
    if (st.uid !== 0 && st.uid !== uid) {
      throw new VdiskError('ERR_MOUNTPOINT', `refusing mountpoint ${mountpoint}: its path goes through ${next}, a symlink owned by uid ${st.uid}`);
    }
    if (++links > MAX_SYMLINKS) throw new VdiskError('ERR_MOUNTPOINT', `too many symlinks in the path of mountpoint ${mountpoint}`);
    const target = await fs.readlink(next);
    if (path.isAbsolute(target)) resolved = '/';
    pending.unshift(...target.split('/').filter(Boolean));
  }
  return resolved;
}

/** open(2) flags of an fd that names a file without opening it for I/O (no side effects on devices or FIFOs). */
const O_PATH = 0o10000000;

/** A mountpoint checked and held open, so the mount lands on the very file checked. */
export interface MountTarget {
  /** The mountpoint as /proc/self/mountinfo will show it (mountinfoPath). */
  path: string;
  /**
   * What to hand to mount(2). As root: /proc/self/fd/N of an O_PATH fd on the
   * file checked, so that renaming a symlink into its place between the check
   * and the mount changes nothing. Not as root: the path, since fusermount3
   * (which runs in a process of its own) checks it again itself.
   */
  mountPath: string;
  /** Release the fd; only after the session that was mounted through it is closed (libfuse keeps mountPath). */
  close(): void;
}

/**
 * Check a mountpoint and hold it open: it must be a regular file, not a
 * symlink (it is opened O_NOFOLLOW), with no symlink of another user on the
 * way to it, and nothing mounted on it yet.
 */
export async function openMountpoint(mountpoint: string): Promise<MountTarget> {
  const target = await mountinfoPath(mountpoint);
  // Check for a mount before touching the file: a dead FUSE mount answers ENOTCONN to everything.
  const mounted = await mountedPaths();
  if (mounted.has(target)) throw new VdiskError('ERR_ALREADY_MOUNTED', `${mountpoint} is already mounted (${mounted.get(target)}); vdisk unmount it first`);
  let fd: number;
  try {
    fd = fsSync.openSync(target, O_PATH | fsConstants.O_NOFOLLOW);
  } catch {
    throw new VdiskError('ERR_MOUNTPOINT', `mountpoint ${mountpoint} does not exist (create an empty file there first)`);
  }
  const st = fsSync.fstatSync(fd);
  if (!st.isFile()) {
    fsSync.closeSync(fd);
    if (st.isSymbolicLink()) {
      throw new VdiskError('ERR_MOUNTPOINT', `mountpoint ${mountpoint} is a symlink; vdisk mounts only on a regular file itself, never on what a link names`);
    }
    throw new VdiskError('ERR_MOUNTPOINT', `mountpoint ${mountpoint} is not a regular file (vdisk mounts the disk as one file)`);
  }
  try {
    await fs.access('/dev/fuse', fsConstants.R_OK | fsConstants.W_OK);
  } catch {
    fsSync.closeSync(fd);
    throw new VdiskError('ERR_NO_FUSE', '/dev/fuse is missing or not accessible (load the fuse module; in a container pass --device /dev/fuse)');
  }
  let open = true;
  return {
    path: target,
    mountPath: process.getuid?.() === 0 ? `/proc/self/fd/${fd}` : target,
    close: () => {
      if (open) fsSync.closeSync(fd);
      open = false;
    },
  };
}

/** The checks of openMountpoint() alone (the CLI runs them before opening the image): the path mountinfo will show. */
export async function checkMountpoint(mountpoint: string): Promise<string> {
  const target = await openMountpoint(mountpoint);
  target.close();
  return target.path;
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
