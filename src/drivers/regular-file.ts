/**
 * Opening an image's host file without hanging on something that is not one.
 * open(2) of a FIFO waits for a writer, forever for `vdisk info fifo`, and
 * opening a device can act on it (a tape rewinds). So:
 *  1. stat the path and refuse anything but a regular file, before opening it;
 *  2. open with O_NONBLOCK: a FIFO swapped in after the stat cannot block the
 *     open either;
 *  3. fstat what was opened and refuse it unless it is a regular file (the
 *     stat in 1 only spares devices an open; this check is the one that holds);
 *  4. clear O_NONBLOCK again (regular-file I/O ignores it on Linux, but open
 *     flags travel to FUSE and network filesystems, which may not).
 * Symlinks are followed: backing files are often links.
 */
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { native } from '../native.js';

function kindOf(st: fs.Stats): string {
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isDirectory()) return 'a directory';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

function notAFile(path: string, st: fs.Stats): VdiskError {
  return new VdiskError('ERR_NOT_A_FILE', `${path} is ${kindOf(st)}; an image must be a regular file`);
}

function stat(path: string): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.stat(path, (err, st) => (err ? reject(err) : resolve(st))));
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

function open(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

/**
 * Open `path` (O_RDONLY or O_RDWR in `flags`) if it is a regular file; a
 * VdiskError ERR_NOT_A_FILE if it is not, Node's error (ENOENT, EACCES...)
 * if it cannot be opened. The fd is blocking, as from a plain open.
 */
export async function openRegularFile(path: string, flags: number): Promise<{ fd: number; stats: fs.Stats }> {
  const before = await stat(path);
  if (!before.isFile()) throw notAFile(path, before);
  const fd = await open(path, flags | fs.constants.O_NONBLOCK);
  try {
    const stats = await fstat(fd);
    if (!stats.isFile()) throw notAFile(path, stats);
    const cleared = native().clearNonBlock(fd);
    if (cleared !== 0) throw Object.assign(new Error(`fcntl(F_SETFL) on ${path} failed (errno ${-cleared})`), { errno: cleared });
    return { fd, stats };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** The first `bytes` bytes of a regular file (fewer if it is shorter), for format probing. */
export async function readFileHead(path: string, bytes: number): Promise<Buffer> {
  const { fd } = await openRegularFile(path, fs.constants.O_RDONLY);
  try {
    const head = Buffer.alloc(bytes);
    const n = await new Promise<number>((resolve, reject) => fs.read(fd, head, 0, bytes, 0, (err, got) => (err ? reject(err) : resolve(got))));
    return head.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}
