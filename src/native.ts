/** Loads the N-API addon (native/vdisk_addon.c and the files beside it) and types its surface. */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { VdiskError } from './errors.js';

/**
 * An opaque FUSE request handle; answered exactly once through a reply*() call.
 * A reply whose arguments the kernel cannot be told (not a number, NaN, a
 * fraction, out of range) still answers, with EIO, then throws
 * ERR_VDISK_REPLY_ARG; a second reply to one request is not sent but throws
 * ERR_VDISK_ANSWERED.
 */
export type FuseReq = { readonly __fuseReq: unique symbol };
export type FuseSessionHandle = { readonly __fuseSession: unique symbol };

export interface FuseHandlers {
  getattr(req: FuseReq): void;
  setattr(req: FuseReq, toSet: number, size: number, mode: number, uid: number, gid: number, mtimeMs: number): void;
  open(req: FuseReq, flags: number): void;
  release(req: FuseReq): void;
  read(req: FuseReq, offset: number, size: number): void;
  write(req: FuseReq, offset: number, data: Buffer): void;
  flush(req: FuseReq): void;
  fsync(req: FuseReq, datasync: number): void;
  fallocate(req: FuseReq, mode: number, offset: number, length: number): void;
  lseek(req: FuseReq, offset: number, whence: number): void;
  statfs(req: FuseReq): void;
}

export interface NativeAddon {
  mount(mountpoint: string, options: { fsOptions: string; maxWrite?: number; maxReadahead?: number }, handlers: FuseHandlers, onExit: (errno: number) => void): FuseSessionHandle;
  /** Take no new requests (those in flight can still be answered). */
  stop(session: FuseSessionHandle): void;
  /** Release the session; aborts the connection if the mount is still there. */
  close(session: FuseSessionHandle): void;
  /** errno 0 (success) to 511; anything else answers EIO. */
  replyErr(req: FuseReq, errno: number): void;
  replyRead(req: FuseReq, buffers: Buffer[]): void;
  /** The same reply, copied into the kernel on a thread-pool thread; keep the buffers until it settles. */
  replyReadAsync(req: FuseReq, buffers: Buffer[]): Promise<void>;
  replyWrite(req: FuseReq, count: number): void;
  replyLseek(req: FuseReq, offset: number): void;
  replyOpen(req: FuseReq, directIo: boolean, keepCache: boolean): void;
  /** attr: [size, blocks, blksize, mode, uid, gid, atimeMs, mtimeMs, ctimeMs] */
  replyAttr(req: FuseReq, attr: number[], timeoutSec: number): void;
  /** statfs: [bsize, blocks, bfree, bavail, files, ffree, namemax] */
  replyStatfs(req: FuseReq, statfs: number[]): void;
  /** Offsets and lengths here are integers from 0 to 2^63-1, else ERR_VDISK_ARG is thrown. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  lseek(fd: number, offset: number, whence: number): Promise<number>;
  umount(path: string, flags: number): Promise<number>;
  /** Synchronous preadv2(RWF_NOWAIT): bytes read from the page cache, or -errno (-EAGAIN: not cached). */
  preadvNoWait(fd: number, buffers: Buffer[], offset: number): number;
  /** flock(LOCK_EX|LOCK_NB): 0, or -errno. */
  flockExclusive(fd: number): number;
  /** SO_PEERCRED of a connected UNIX socket: [pid, uid, gid], or -errno. */
  peerCredentials(fd: number): [number, number, number] | number;
  /** fcntl(F_SETFL) without O_NONBLOCK: 0, or -errno. */
  clearNonBlock(fd: number): number;
}

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const MNT_DETACH = 2;
/** umount2(): do not follow a symlink in the last component (a mount is on the file itself). */
export const UMOUNT_NOFOLLOW = 8;

let addon: NativeAddon | null = null;

export function native(): NativeAddon {
  if (addon) return addon;
  const here = path.dirname(fileURLToPath(import.meta.url));
  const require = createRequire(import.meta.url);
  const candidate = path.resolve(here, '..', 'build', 'Release', 'vdisk_fuse.node');
  try {
    addon = require(candidate) as NativeAddon;
  } catch (err) {
    throw new VdiskError('ERR_NATIVE_ADDON', `cannot load ${candidate} (run: npm run build:native; needs libfuse3-dev)`, { cause: err });
  }
  return addon;
}
