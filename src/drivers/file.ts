/**
 * raw: an image that is a host file, byte for byte. Reads and writes are
 * positional vectored calls on the libuv pool; write-zeroes and discard use
 * fallocate and block status uses SEEK_DATA/SEEK_HOLE, through the addon
 * (Node has neither).
 */
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { BlockDriver, DriverBlockStatus, ZeroFlags } from '../block/driver.js';
import { VdiskError, notSupported } from '../errors.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, SEEK_DATA, SEEK_HOLE, native } from '../native.js';
import { tracer } from '../trace.js';
import { openRegularFile } from './regular-file.js';

const trace = tracer('raw');
const EAGAIN = osConstants.errno.EAGAIN;
/** The addon's iovec limit for one call. */
const MAX_NOWAIT_IOV = 256;
/**
 * Reads up to this size try the page cache inline first: for them the thread
 * hop is most of the cost. Larger reads go to the pool, where their copies run
 * on other cores while the loop thread answers the kernel (measured: 1 MiB
 * sequential reads were faster that way).
 */
const NOWAIT_MAX_BYTES = 128 * 1024;
/**
 * Writes this large go to the kernel one at a time per file. A buffered write
 * holds the file's inode lock for its whole copy, so a second large one beside
 * it only spins on that lock (perf: 5% of the CPU of a copy-on-read pass, whose
 * copies trail their reads). Smaller writes are left to the kernel: for them
 * the wait is shorter than a trip back through the event loop.
 */
const SERIAL_WRITE_MIN_BYTES = 256 * 1024;

export interface FileOpenOptions {
  readOnly?: boolean;
  /** Allow writes past the end (the file under a format driver; never a block device). */
  growable?: boolean;
  /** Accept a block device (only the image the user named: regular-file.ts says why). */
  allowBlockDevice?: boolean;
}

function readv(fd: number, iov: Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.readv(fd, iov, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function writev(fd: number, iov: Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => fs.writev(fd, iov, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: string }).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'EINVAL';
}

/** Skip the first `n` bytes of an iov (views, no copies). */
function iovAdvance(iov: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of iov) {
    if (n >= b.length) {
      n -= b.length;
      continue;
    }
    out.push(n ? b.subarray(n) : b);
    n = 0;
  }
  return out;
}

/** Open `path` (mapping host errors to ours) and, for writing, take the one-writer lock. */
async function openLocked(path: string, readOnly: boolean, allowBlockDevice?: boolean): Promise<{ fd: number; size: number; blockDevice: boolean }> {
  let opened: { fd: number; size: number; blockDevice: boolean };
  try {
    // A FIFO or device is refused without blocking in open() (ERR_NOT_A_FILE).
    opened = await openRegularFile(path, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR, allowBlockDevice);
  } catch (err) {
    if (err instanceof VdiskError) throw err;
    const code = (err as { code?: string }).code;
    if (code === 'ENOENT') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${path}`, { cause: err });
    if (code === 'EACCES' || code === 'EPERM') throw new VdiskError('EACCES', `cannot open ${path}${readOnly ? '' : ' for writing'}: permission denied`, { cause: err });
    // O_EXCL on a block device: the kernel has it mounted, or another opener holds it exclusively.
    if (code === 'EBUSY') throw new VdiskError('EBUSY', `${path} is in use (a mounted block device?)`, { cause: err });
    if (code === 'EROFS') throw new VdiskError('EROFS', `${path} is on a read-only filesystem (use --read-only)`, { cause: err });
    throw err;
  }
  // One writer at a time: a second process writing the same image would corrupt it.
  const locked = readOnly ? 0 : native().flockExclusive(opened.fd);
  if (locked === -osConstants.errno.EWOULDBLOCK) {
    fs.closeSync(opened.fd);
    throw new VdiskError('EBUSY', `${path} is in use by another process (mounted? vdisk stream works on mounted images)`);
  }
  // A filesystem without locks (ENOLCK on some NFS) is no reason to refuse the image.
  if (locked !== 0) trace('no lock on %s (errno %d): a second writer would not be refused', path, -locked);
  return opened;
}

export class FileDriver implements BlockDriver {
  readonly formatName = 'raw';
  readonly limits = { requestAlignment: 1, maxTransfer: 64 * 1024 * 1024 };
  readOnly: boolean;
  readonly growable: boolean;
  /** A punched hole reads as zero (pdiscard fails with ENOTSUP where holes cannot be punched). */
  readonly discardLeaves = 'zero';
  readonly path: string;
  private fd: number;
  private bytes: number;
  // Learnt once per file: which fallocate modes the host filesystem refuses.
  private canZeroRange = true;
  private canPunchHole = true;
  private canSeekData = true;
  private canReadNoWait = true;
  /** The last large write queued: the next one starts after it (SERIAL_WRITE_MIN_BYTES). */
  private largeWrites: Promise<void> = Promise.resolve();

  /** A block device has a fixed size and every byte of it is "allocated". */
  private readonly blockDevice: boolean;

  private constructor(path: string, fd: number, size: number, readOnly: boolean, growable: boolean, blockDevice: boolean) {
    this.path = path;
    this.blockDevice = blockDevice;
    this.fd = fd;
    this.bytes = size;
    this.readOnly = readOnly;
    this.growable = growable;
  }

  static async open(path: string, options: FileOpenOptions = {}): Promise<FileDriver> {
    const readOnly = options.readOnly ?? false;
    const { fd, size, blockDevice } = await openLocked(path, readOnly, options.allowBlockDevice);
    trace('open path=%s size=%d readOnly=%s blockDevice=%s', path, size, readOnly, blockDevice);
    return new FileDriver(path, fd, size, readOnly, !blockDevice && (options.growable ?? false), blockDevice);
  }

  /**
   * Open the file again read-write (taking the writer's lock) or read-only
   * (giving it up), then let the old descriptor go. The node is drained
   * (graph.ts reopen): no request holds the old descriptor.
   */
  async reopen(readOnly: boolean): Promise<void> {
    if (this.fd < 0) throw new VdiskError('EIO', `${this.path} is closed`);
    const { fd } = await openLocked(this.path, readOnly, this.blockDevice);
    const old = this.fd;
    this.fd = fd;
    this.readOnly = readOnly;
    await new Promise<void>((resolve) => fs.close(old, () => resolve()));
    trace('reopen path=%s readOnly=%s', this.path, readOnly);
  }

  size(): number {
    return this.bytes;
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    let done = 0;
    if (this.canReadNoWait && bytes <= NOWAIT_MAX_BYTES && iov.length <= MAX_NOWAIT_IOV) {
      // Whatever the host page cache holds is copied right here, without a
      // thread-pool round trip; only the rest goes to the pool.
      const n = native().preadvNoWait(this.fd, iov, offset);
      if (n === bytes) return;
      if (n > 0) done = n;
      else if (n !== -EAGAIN && n !== 0) {
        trace('RWF_NOWAIT reads unavailable on %s (errno %d)', this.path, -n);
        this.canReadNoWait = false;
      }
    }
    while (done < bytes) {
      const rest = done ? iovAdvance(iov, done) : iov;
      const n = await readv(this.fd, rest, offset + done);
      if (n === 0) {
        // The file shrank under us: what is past its end reads as zero.
        for (const b of rest) b.fill(0);
        return;
      }
      done += n;
    }
  }

  pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    if (bytes < SERIAL_WRITE_MIN_BYTES) return this.writeAll(offset, bytes, iov);
    const write = this.largeWrites.then(() => this.writeAll(offset, bytes, iov));
    this.largeWrites = write.catch(() => undefined);
    return write;
  }

  private async writeAll(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    let done = 0;
    while (done < bytes) {
      done += await writev(this.fd, done ? iovAdvance(iov, done) : iov, offset + done);
    }
    if (offset + bytes > this.bytes) this.bytes = offset + bytes;
  }

  async truncate(size: number): Promise<void> {
    if (this.blockDevice) throw new VdiskError('EINVAL', `${this.path} is a block device: its size is fixed`);
    await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, size, (err) => (err ? reject(err) : resolve())));
    this.bytes = size;
  }

  async pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    const addon = native();
    if (flags.mayUnmap && (await this.tryPunchHole(offset, bytes))) return;
    if (this.canZeroRange) {
      try {
        await addon.fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, bytes);
        return;
      } catch (err) {
        if (!isUnsupported(err)) throw err;
        trace('ZERO_RANGE unsupported on %s; trying PUNCH_HOLE', this.path);
        this.canZeroRange = false;
      }
    }
    if (await this.tryPunchHole(offset, bytes)) {
      // Not asked to unmap: take the space back so later writes cannot fail with ENOSPC.
      if (!flags.mayUnmap) await addon.fallocate(this.fd, 0, offset, bytes).catch(() => undefined);
      return;
    }
    throw notSupported('fallocate on this filesystem');
  }

  async pdiscard(offset: number, bytes: number): Promise<void> {
    if (!(await this.tryPunchHole(offset, bytes))) throw notSupported('punching holes on this filesystem');
  }

  private async tryPunchHole(offset: number, bytes: number): Promise<boolean> {
    if (!this.canPunchHole) return false;
    try {
      await native().fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
      return true;
    } catch (err) {
      if (!isUnsupported(err)) throw err;
      trace('PUNCH_HOLE unsupported on %s', this.path);
      this.canPunchHole = false;
      return false;
    }
  }

  async blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    const all: DriverBlockStatus = { bytes, allocated: true, zero: false, data: true, hostOffset: offset };
    if (!this.canSeekData) return all;
    const addon = native();
    let data: number;
    try {
      data = await addon.lseek(this.fd, offset, SEEK_DATA);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'ENXIO') return { bytes, allocated: true, zero: true, data: false };
      if (isUnsupported(err)) {
        this.canSeekData = false;
        return all;
      }
      throw err;
    }
    if (data > offset) return { bytes: Math.min(bytes, data - offset), allocated: true, zero: true, data: false };
    const hole = await addon.lseek(this.fd, offset, SEEK_HOLE);
    return { ...all, bytes: Math.max(1, Math.min(bytes, hole - offset)) };
  }

  async flush(): Promise<void> {
    await fdatasync(this.fd);
  }

  async allocatedBytes(): Promise<number> {
    if (this.blockDevice) return this.bytes;
    return (await fstat(this.fd)).blocks * 512;
  }

  async close(): Promise<void> {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    await new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
  }
}
