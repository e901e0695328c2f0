/**
 * The FUSE export: one regular file whose contents are the virtual disk.
 * Each file operation becomes block requests on the top node; this is the
 * only place where errors become errno values.
 *
 * Semantics (docs/FUSE.md has the user-facing version, with errors and stopping):
 * - The mountpoint is an existing regular file; it is the disk while mounted.
 * - The size is fixed. Reads past the end return 0 bytes; a write that starts
 *   at or past the end fails with ENOSPC and one that crosses it is cut short,
 *   as on a block device. O_TRUNC is ignored (as on a block device), so
 *   `cp image mountpoint` overwrites in place; truncate to another size is EINVAL.
 * - fallocate: ZERO_RANGE (with or without KEEP_SIZE) is write-zeroes;
 *   PUNCH_HOLE|KEEP_SIZE is a discard where the node says a discard leaves
 *   zeroes (io.discardLeavesZeroes), else write-zeroes that may unmap, so the
 *   range always reads as zero afterwards, whatever the backing chain holds; mode 0 and
 *   KEEP_SIZE alone succeed inside the disk (every byte is already there) and
 *   fail with ENOSPC past its end; other modes are EOPNOTSUPP.
 * - SEEK_DATA/SEEK_HOLE use block status above the chain; ranges that read as
 *   zero are holes; SEEK_DATA past the last data gives ENXIO.
 * - Page cache: kept (keep_cache, stable mtime, write-through), so repeated
 *   reads come from the kernel, and mmap and loop devices work. --direct-io
 *   sends every read and write to vdisk instead.
 */
import { constants as fsConstants } from 'node:fs';
import type { BlockNode } from '../block/node.js';
import { NodeRoot } from '../block/graph.js';
import * as io from '../block/io.js';
import { BufferPool } from '../block/buffer-pool.js';
import { blockStatusAbove } from '../block/block-status.js';
import { VdiskError, errnoOf } from '../errors.js';
import { MNT_DETACH, UMOUNT_NOFOLLOW, native, type FuseReq, type FuseSessionHandle, type NativeAddon } from '../native.js';
import { SEEK_DATA, SEEK_HOLE } from '../native.js';
import { tracer } from '../trace.js';
import { openMountpoint, setReadahead, type MountTarget } from './mountpoint.js';
import { constants as osConstants } from 'node:os';

const trace = tracer('fuse');
const E = osConstants.errno;

const O_ACCMODE = 3;
const FALLOC_KEEP_SIZE = 0x01;
const FALLOC_PUNCH_HOLE = 0x02;
const FALLOC_ZERO_RANGE = 0x10;

const SET_ATTR_MODE = 1 << 0;
const SET_ATTR_UID = 1 << 1;
const SET_ATTR_GID = 1 << 2;
const SET_ATTR_SIZE = 1 << 3;
const SET_ATTR_MTIME = 1 << 5;
const SET_ATTR_MTIME_NOW = 1 << 8;

/** Largest read or write the kernel sends (max_write, max_read, max_pages). */
export const FUSE_MAX_IO_BYTES = 1024 * 1024;
/**
 * Idle read buffers kept for reuse (the kernel rarely has more than 32 MiB of
 * reads in flight): a fresh 1 MiB buffer per request costs page faults on
 * first touch and an munmap on free, which dominated 1 MiB reads.
 */
const MAX_POOLED_READ_BYTES = 32 * FUSE_MAX_IO_BYTES;
/**
 * Read replies this large are copied into the kernel from a thread-pool thread:
 * the copy is the loop thread's biggest cost on sequential reads, while for
 * small reads the thread hop would cost more latency than the copy.
 */
const ASYNC_REPLY_MIN_BYTES = 256 * 1024;

export interface ExportOptions {
  mountpoint: string;
  readOnly?: boolean;
  /** Let other users open the file (mode 0644 instead of 0600; needs user_allow_other for non-root). */
  allowOther?: boolean;
  /** Bypass the kernel page cache. */
  directIo?: boolean;
  /** Kernel readahead for the mount, KiB (the kernel default is 128). */
  readaheadKiB?: number;
  /** fsname shown in /proc/mounts. */
  fsname?: string;
}

/**
 * Release the mountpoint's fd once libfuse is done with the session: the
 * session keeps /proc/self/fd/N as its mountpoint and may umount2() it in the
 * handle's close callback, which libuv runs in the closing phase of this loop
 * iteration or the next. Two setImmediate hops land after either, so N is never
 * reused for another file while libfuse can still unmount through it.
 */
function closeAfterSession(target: MountTarget | null): void {
  if (target) setImmediate(() => setImmediate(() => target.close()));
}

export interface ExportStats {
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
  errors: number;
}

/** Sends the answer; a reply copied off the loop thread settles when the kernel has it. */
type Reply = () => void | Promise<void>;

export class FuseExport {
  /** Every request enters through the root, so the node under the export can be swapped (graph.ts replaceNode). */
  readonly root: NodeRoot;
  readonly mountpoint: string;
  readonly stats: ExportStats = { reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0, errors: 0 };
  /** Resolves when the kernel ends the session (unmounted or aborted). */
  readonly ended: Promise<number>;
  private readonly addon: NativeAddon;
  private readonly options: ExportOptions;
  private session: FuseSessionHandle | null = null;
  /** The mountpoint held open since it was checked; libfuse keeps its /proc/self/fd path until the session is closed. */
  private target: MountTarget | null = null;
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private endedResolve!: (errno: number) => void;
  private closing: Promise<void> | null = null;
  private readonly readBuffers = new BufferPool(MAX_POOLED_READ_BYTES);
  private mode: number;
  private uid = process.getuid?.() ?? 0;
  private gid = process.getgid?.() ?? 0;
  private mtimeMs = Date.now();
  private ctimeMs = this.mtimeMs;

  private constructor(node: BlockNode, options: ExportOptions) {
    this.root = new NodeRoot(node);
    this.options = options;
    this.mountpoint = options.mountpoint;
    this.addon = native();
    const perm = options.allowOther ? 0o644 : 0o600;
    this.mode = fsConstants.S_IFREG | (options.readOnly || node.readOnly ? perm & 0o444 : perm);
    this.ended = new Promise((resolve) => (this.endedResolve = resolve));
  }

  /** Mount `node` on `options.mountpoint` and start serving on this event loop. */
  static async start(node: BlockNode, options: ExportOptions): Promise<FuseExport> {
    const target = await openMountpoint(options.mountpoint);
    const mountpoint = target.path;
    const exp = new FuseExport(node, { ...options, mountpoint });
    exp.target = target;
    try {
      exp.mount(target.mountPath);
    } catch (err) {
      target.close();
      throw err;
    }
    try {
      await setReadahead(mountpoint, options.readaheadKiB ?? 1024);
    } catch (err) {
      trace('readahead not raised: %s', (err as Error).message);
    }
    return exp;
  }

  /** The node the export serves now. */
  get node(): BlockNode {
    return this.root.node;
  }

  private get readOnly(): boolean {
    return Boolean(this.options.readOnly) || this.node.readOnly;
  }

  /** `mountPath`: where mount(2) goes (MountTarget.mountPath); this.mountpoint is what messages show. */
  private mount(mountPath: string): void {
    const fsname = (this.options.fsname ?? `vdisk:${this.node.name}`).replace(/[,\\]/g, '_');
    const opts = [`fsname=${fsname}`, 'subtype=vdisk', 'default_permissions', `max_read=${FUSE_MAX_IO_BYTES}`];
    if (this.readOnly) opts.push('ro');
    if (this.options.allowOther) opts.push('allow_other');
    trace('mount mountpoint=%s options=%s', this.mountpoint, opts.join(','));
    try {
      this.session = this.addon.mount(
        mountPath,
        { fsOptions: opts.join(','), maxWrite: FUSE_MAX_IO_BYTES, maxReadahead: FUSE_MAX_IO_BYTES },
        this.handlers(),
        (errno) => {
          trace('session ended errno=%d', errno);
          this.endedResolve(errno);
        },
      );
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'EACCES' || code === 'EPERM') {
        throw new VdiskError('ERR_FUSE_MOUNT', `cannot mount on ${this.mountpoint}: permission denied (root, or fusermount3 with user_allow_other for --allow-other)`, { cause: err });
      }
      throw new VdiskError('ERR_FUSE_MOUNT', `cannot mount on ${this.mountpoint}: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * Stop serving. Without `force`, the mount is detached first and vdisk keeps
   * answering until the last open file is closed, so nothing in flight is lost;
   * with `force`, open files see ENOTCONN from now on. Either way every request
   * already handed to vdisk is answered and the image is flushed before return.
   */
  async stop(force = false): Promise<void> {
    if (!force && this.session) {
      try {
        await this.addon.umount(this.mountpoint, MNT_DETACH | UMOUNT_NOFOLLOW);
      } catch (err) {
        // EINVAL: not mounted any more (someone else unmounted it); the session ends on its own.
        if ((err as { code?: string }).code !== 'EINVAL') throw err;
      }
      await this.ended;
    }
    await this.close();
  }

  /** Answer what is in flight, flush the image, release the session. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      // Under load new requests would keep arriving and idle() might never come.
      if (this.session) this.addon.stop(this.session);
      await this.idle();
      try {
        if (!this.readOnly) await io.flush(this.node);
      } finally {
        if (this.session) this.addon.close(this.session);
        this.session = null;
        closeAfterSession(this.target);
        this.endedResolve(0);
      }
    })();
    return this.closing;
  }

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Run one request: `work` resolves to the reply to send, or fails with the
   * error to answer. Whatever throws on the way (building the reply, sending
   * it, answering the error) still ends in an answer: see answerAfterFailure.
   */
  private serve(req: FuseReq, op: string, work: () => Promise<Reply>): void {
    this.inFlight++;
    // Through the root: a drain holds new requests back, and an answer goes
    // out before the node under the export can change (replaceNode).
    this.root
      .run(async () => {
        let reply: Reply;
        try {
          reply = await work();
        } catch (err) {
          const errno = errnoOf(err);
          if (errno !== E.ENXIO) this.stats.errors++;
          trace('%s failed errno=%d: %s', op, errno, (err as Error)?.message);
          if (errno === E.EIO) process.stderr.write(`vdisk: ${op} failed: ${(err as Error)?.message ?? err}\n`);
          this.addon.replyErr(req, errno);
          return;
        }
        await reply();
      })
      .catch((err: unknown) => this.answerAfterFailure(req, op, err))
      .finally(() => {
        if (--this.inFlight === 0 && this.idleWaiters.length) {
          const waiters = this.idleWaiters;
          this.idleWaiters = [];
          for (const w of waiters) w();
        }
      });
  }

  /**
   * The last resort when sending an answer threw (an argument the addon could
   * not convert, a bug in a reply): answer EIO, or the process doing the I/O
   * waits forever. Safe whether or not an answer went out: the addon answers a
   * reply it cannot convert with EIO itself and refuses a second reply to one
   * request (ERR_VDISK_ANSWERED) instead of sending it.
   */
  private answerAfterFailure(req: FuseReq, op: string, err: unknown): void {
    this.stats.errors++;
    process.stderr.write(`vdisk: error EIO: internal error answering ${op}: ${(err as Error)?.message ?? String(err)}\n`);
    try {
      this.addon.replyErr(req, E.EIO);
    } catch (again) {
      trace('%s: no second answer: %s', op, (again as Error)?.message);
    }
  }

  private fail(code: 'EROFS' | 'ENOSPC' | 'EINVAL' | 'ENOTSUP' | 'ENXIO', message: string): never {
    throw new VdiskError(code, message);
  }

  private async attrReply(req: FuseReq): Promise<Reply> {
    const size = this.node.size();
    const allocated = await this.node.allocatedBytes();
    const blksize = Math.max(4096, this.node.limits.requestAlignment);
    const attr = [size, Math.ceil(allocated / 512), blksize, this.mode, this.uid, this.gid, this.mtimeMs, this.mtimeMs, this.ctimeMs];
    // Timeout 0: st_blocks moves with every write and punch, and `du` must see it.
    return () => this.addon.replyAttr(req, attr, 0);
  }

  private handlers() {
    const addon = this.addon;
    return {
      getattr: (req: FuseReq) => this.serve(req, 'getattr', () => this.attrReply(req)),

      setattr: (req: FuseReq, toSet: number, size: number, mode: number, uid: number, gid: number, mtimeMs: number) =>
        this.serve(req, 'setattr', async () => {
          if (toSet & SET_ATTR_SIZE) {
            if (this.readOnly) this.fail('EROFS', 'read-only export');
            if (size !== this.node.size()) this.fail('EINVAL', `the disk has a fixed size of ${this.node.size()} bytes; truncate to ${size} refused`);
          }
          if (toSet & SET_ATTR_MODE) this.mode = fsConstants.S_IFREG | (mode & 0o7777);
          if (toSet & SET_ATTR_UID) this.uid = uid;
          if (toSet & SET_ATTR_GID) this.gid = gid;
          if (toSet & SET_ATTR_MTIME_NOW) this.mtimeMs = Date.now();
          else if (toSet & SET_ATTR_MTIME) this.mtimeMs = mtimeMs;
          this.ctimeMs = Date.now();
          return this.attrReply(req);
        }),

      open: (req: FuseReq, flags: number) =>
        this.serve(req, 'open', async () => {
          if (this.readOnly && (flags & O_ACCMODE) !== fsConstants.O_RDONLY) this.fail('EROFS', 'read-only export');
          const directIo = Boolean(this.options.directIo);
          return () => addon.replyOpen(req, directIo, !directIo);
        }),

      release: (req: FuseReq) => this.serve(req, 'release', async () => () => addon.replyErr(req, 0)),

      read: (req: FuseReq, offset: number, size: number) =>
        this.serve(req, 'read', async () => {
          const bytes = Math.max(0, Math.min(size, this.node.size() - offset));
          if (bytes === 0) return () => addon.replyRead(req, []);
          const buf = this.readBuffers.take(bytes);
          try {
            await io.preadv(this.node, offset, bytes, [buf]);
          } catch (err) {
            this.readBuffers.give(buf);
            throw err;
          }
          this.stats.reads++;
          this.stats.bytesRead += bytes;
          if (bytes >= ASYNC_REPLY_MIN_BYTES) {
            return () => addon.replyReadAsync(req, [buf]).finally(() => this.readBuffers.give(buf));
          }
          return () => {
            // The kernel has copied the data once replyRead returns: the buffer is free again.
            try {
              addon.replyRead(req, [buf]);
            } finally {
              this.readBuffers.give(buf);
            }
          };
        }),

      write: (req: FuseReq, offset: number, data: Buffer) =>
        this.serve(req, 'write', async () => {
          if (this.readOnly) this.fail('EROFS', 'read-only export');
          const size = this.node.size();
          if (offset >= size) this.fail('ENOSPC', `write at ${offset} is past the end of the disk (${size} bytes)`);
          const bytes = Math.min(data.length, size - offset);
          await io.pwritev(this.node, offset, bytes, [bytes === data.length ? data : data.subarray(0, bytes)]);
          this.stats.writes++;
          this.stats.bytesWritten += bytes;
          this.mtimeMs = this.ctimeMs = Date.now();
          return () => addon.replyWrite(req, bytes);
        }),

      // close(2) promises no durability; fsync does.
      flush: (req: FuseReq) => this.serve(req, 'flush', async () => () => addon.replyErr(req, 0)),

      fsync: (req: FuseReq) =>
        this.serve(req, 'fsync', async () => {
          await io.flush(this.node);
          return () => addon.replyErr(req, 0);
        }),

      fallocate: (req: FuseReq, mode: number, offset: number, length: number) =>
        this.serve(req, 'fallocate', async () => {
          await this.fallocate(mode, offset, length);
          return () => addon.replyErr(req, 0);
        }),

      lseek: (req: FuseReq, offset: number, whence: number) =>
        this.serve(req, 'lseek', async () => {
          const pos = await this.seekDataHole(offset, whence);
          return () => addon.replyLseek(req, pos);
        }),

      statfs: (req: FuseReq) =>
        this.serve(req, 'statfs', async () => {
          const bsize = 4096;
          const blocks = Math.ceil(this.node.size() / bsize);
          const used = Math.ceil((await this.node.allocatedBytes()) / bsize);
          const free = Math.max(0, blocks - used);
          return () => addon.replyStatfs(req, [bsize, blocks, free, free, 1, 0, 255]);
        }),
    };
  }

  private async fallocate(mode: number, offset: number, length: number): Promise<void> {
    if (this.readOnly) this.fail('EROFS', 'read-only export');
    if (mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE)) this.fail('ENOTSUP', `fallocate mode 0x${mode.toString(16)} is not supported`);
    if (offset < 0 || length <= 0) this.fail('EINVAL', 'fallocate needs offset >= 0 and length > 0');
    const size = this.node.size();
    const end = Math.min(offset + length, size);
    const keepSize = (mode & FALLOC_KEEP_SIZE) !== 0;
    if (mode & FALLOC_PUNCH_HOLE) {
      // Linux requires KEEP_SIZE with PUNCH_HOLE, and PUNCH_HOLE excludes ZERO_RANGE.
      if (!keepSize || mode & FALLOC_ZERO_RANGE) this.fail('ENOTSUP', 'PUNCH_HOLE needs KEEP_SIZE and excludes ZERO_RANGE');
      // The range must read as zero afterwards, as on a Linux file. A discard
      // does where the node says so (a host file; qcow2 with nothing below);
      // elsewhere a backing node would show through: write-zeroes that may unmap.
      if (offset >= end) return;
      if (io.discardLeavesZeroes(this.node)) await io.pdiscard(this.node, offset, end - offset, { mustZero: true });
      else await io.pwriteZeroes(this.node, offset, end - offset, { mayUnmap: true });
      return;
    }
    if (!keepSize && offset + length > size) this.fail('ENOSPC', `the disk has a fixed size of ${size} bytes and cannot grow`);
    if (mode & FALLOC_ZERO_RANGE) {
      if (offset < end) await io.pwriteZeroes(this.node, offset, end - offset, { mayUnmap: false });
    }
    // Plain allocation inside the disk: every byte is already addressable, nothing to do.
  }

  private async seekDataHole(offset: number, whence: number): Promise<number> {
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) this.fail('EINVAL', `lseek whence ${whence}`);
    const size = this.node.size();
    if (offset < 0 || offset >= size) this.fail('ENXIO', `offset ${offset} is at or past the end`);
    for (let pos = offset; pos < size; ) {
      const st = await blockStatusAbove(this.node, pos, size - pos);
      if (whence === SEEK_DATA ? !st.zero : st.zero) return pos;
      pos += st.bytes;
    }
    // SEEK_DATA in a trailing hole has no answer: ENXIO, as on Linux files (cp relies on it).
    if (whence === SEEK_DATA) this.fail('ENXIO', 'no data after this offset');
    return size;
  }
}
