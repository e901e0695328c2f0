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
 *
 * A block device is accepted only where the caller allows it (the image the
 * user named, never a backing file an image names: an image is someone else's
 * input, and /dev/sda as its backing file would serve the host's disk). Its
 * size comes from lseek(SEEK_END), since fstat says 0; a writable one is opened
 * O_EXCL, which the kernel refuses while the device is mounted or in use.
 */
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { native } from '../native.js';

const SEEK_END = 2;
/** open(2)'s access-mode bits (Node's constants lack it). */
const O_ACCMODE = 3;

function kindOf(st: fs.Stats): string {
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isDirectory()) return 'a directory';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

function notAFile(path: string, st: fs.Stats): VdiskError {
  return new VdiskError('ERR_NOT_A_FILE', `${path} is ${kindOf(st)}; an image must be a regular file${st.isBlockDevice() ? ' (a block device only when named on the command line)' : ''}`);
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

export interface OpenedFile {
  fd: number;
  /** Bytes: the file's size, or the block device's. */
  size: number;
  blockDevice: boolean;
}

/**
 * Open `path` (O_RDONLY or O_RDWR in `flags`) if it is a regular file, or a
 * block device when `allowBlockDevice`; a VdiskError ERR_NOT_A_FILE if it is
 * not, Node's error (ENOENT, EACCES, EBUSY...) if it cannot be opened. The fd
 * is blocking, as from a plain open.
 */
export async function openRegularFile(path: string, flags: number, allowBlockDevice = false): Promise<OpenedFile> {
  const acceptable = (st: fs.Stats) => st.isFile() || (allowBlockDevice && st.isBlockDevice());
  const before = await stat(path);
  if (!acceptable(before)) throw notAFile(path, before);
  const exclusive = before.isBlockDevice() && (flags & O_ACCMODE) !== fs.constants.O_RDONLY ? fs.constants.O_EXCL : 0;
  const fd = await open(path, flags | fs.constants.O_NONBLOCK | exclusive);
  try {
    const stats = await fstat(fd);
    if (!acceptable(stats)) throw notAFile(path, stats);
    const cleared = native().clearNonBlock(fd);
    if (cleared !== 0) throw new VdiskError('EIO', `fcntl(F_SETFL) on ${path} failed (errno ${-cleared})`);
    const blockDevice = stats.isBlockDevice();
    const size = blockDevice ? await native().lseek(fd, 0, SEEK_END) : stats.size;
    return { fd, size, blockDevice };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** The first `bytes` bytes of a regular file (fewer if it is shorter), for format probing. */
export async function readFileHead(path: string, bytes: number, allowBlockDevice = false): Promise<Buffer> {
  const { fd } = await openRegularFile(path, fs.constants.O_RDONLY, allowBlockDevice);
  try {
    const head = Buffer.alloc(bytes);
    const n = await new Promise<number>((resolve, reject) => fs.read(fd, head, 0, bytes, 0, (err, got) => (err ? reject(err) : resolve(got))));
    return head.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}
