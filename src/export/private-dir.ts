/**
 * A directory only the current user can write, for the control sockets. A
 * socket in a directory another user can write is one she can swap for her
 * own (and answer root's requests), so every component of the path is checked
 * with lstat: a real directory (no symlink), owned by root or the user, and
 * writable by nobody else, except a root-owned sticky directory such as /tmp,
 * where others cannot rename or remove what is ours. The last component must
 * be the user's own. Missing components are created with mode 0700.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { VdiskError } from '../errors.js';

const S_ISVTX = 0o1000;

/** Why `st` may not be part of a private path, or null when it may. */
function unsafeReason(st: import('node:fs').Stats, uid: number, last: boolean): string | null {
  if (st.isSymbolicLink()) return 'is a symlink';
  if (!st.isDirectory()) return 'is not a directory';
  if (last ? st.uid !== uid : st.uid !== 0 && st.uid !== uid) return `is owned by uid ${st.uid}`;
  const othersWrite = (st.mode & 0o022) !== 0;
  if (othersWrite && (last || st.uid !== 0 || (st.mode & S_ISVTX) === 0)) return `is writable by others (mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')})`;
  return null;
}

/**
 * Check (and, with `create`, make) a private directory. Returns false when it
 * does not exist and `create` is false; throws ERR_UNSAFE_PATH when it, or any
 * directory above it, is not safe.
 */
export async function ensurePrivateDir(dir: string, options: { create: boolean }): Promise<boolean> {
  const uid = process.getuid?.() ?? 0;
  const parts = path.resolve(dir).split('/').filter(Boolean);
  let current = '/';
  for (let i = 0; i < parts.length; i++) {
    current = path.join(current, parts[i]!);
    const last = i === parts.length - 1;
    let st = await fs.lstat(current).catch((err: { code?: string }) => {
      if (err.code === 'ENOENT') return null;
      throw err;
    });
    if (!st) {
      if (!options.create) return false;
      // Someone may create it between our lstat and mkdir: then it is checked like any other.
      await fs.mkdir(current, { mode: 0o700 }).catch((err: { code?: string }) => {
        if (err.code !== 'EEXIST') throw err;
      });
      st = await fs.lstat(current);
    }
    const reason = unsafeReason(st, uid, last);
    if (reason) {
      throw new VdiskError('ERR_UNSAFE_PATH', `${current} ${reason}: not a safe place for vdisk's control sockets${last ? '' : ` (${dir})`}`);
    }
  }
  return true;
}
