/**
 * One error table for vdisk. Every error carries a stable `code` and the errno
 * the FUSE export answers with; only the export converts errors to errno.
 * Corrupt-image errors (ERR_IMAGE_*) are kept apart from I/O errors (EIO).
 */
import { constants as osConstants } from 'node:os';

const E = osConstants.errno;

export const ERROR_TABLE = {
  EIO: { errno: E.EIO, message: 'input/output error' },
  EINVAL: { errno: E.EINVAL, message: 'invalid argument' },
  ENOSPC: { errno: E.ENOSPC, message: 'no space left on the device' },
  ENOTSUP: { errno: E.EOPNOTSUPP, message: 'operation not supported' },
  EROFS: { errno: E.EROFS, message: 'the image is read-only' },
  EBUSY: { errno: E.EBUSY, message: 'resource busy' },
  ENOENT: { errno: E.ENOENT, message: 'no such file' },
  ENXIO: { errno: E.ENXIO, message: 'no data past this offset' },
  EPERM: { errno: E.EPERM, message: 'operation not permitted' },
  EACCES: { errno: E.EACCES, message: 'permission denied' },
  ENODEV: { errno: E.ENODEV, message: 'no such device' },
  ECANCELED: { errno: E.ECANCELED, message: 'operation canceled' },
  EEXIST: { errno: E.EEXIST, message: 'file exists' },
  EFBIG: { errno: E.EFBIG, message: 'file too large for the filesystem' },
  ERR_USAGE: { errno: E.EINVAL, message: 'bad command-line usage' },
  ERR_IMAGE_NOT_FOUND: { errno: E.ENOENT, message: 'image file not found' },
  ERR_IMAGE_FORMAT: { errno: E.EINVAL, message: 'unknown or unsupported image format' },
  ERR_IMAGE_CORRUPT: { errno: E.EIO, message: 'the image is corrupt' },
  ERR_NOT_A_FILE: { errno: E.EINVAL, message: 'the image is not a regular file (a FIFO, a device, a directory)' },
  ERR_MOUNTPOINT: { errno: E.EINVAL, message: 'the mountpoint must be an existing regular file' },
  ERR_ALREADY_MOUNTED: { errno: E.EBUSY, message: 'the mountpoint is already mounted' },
  ERR_NOT_MOUNTED: { errno: E.EINVAL, message: 'nothing is mounted there' },
  ERR_NO_FUSE: { errno: E.ENODEV, message: '/dev/fuse is missing or not accessible' },
  ERR_FUSE_MOUNT: { errno: E.EIO, message: 'the FUSE mount failed' },
  ERR_HTTP: { errno: E.EIO, message: 'the HTTP server gave an unusable answer' },
  ERR_HTTP_NO_RANGES: { errno: E.EIO, message: 'the HTTP server does not do range requests' },
  ERR_HTTP_TLS: { errno: E.EIO, message: "the HTTPS server's certificate is not trusted" },
  ERR_REMOTE_CHANGED: { errno: E.EIO, message: 'the remote image changed since it was opened' },
  ERR_NATIVE_ADDON: { errno: E.ENOSYS, message: 'the native addon is not built' },
  ERR_UNSAFE_PATH: { errno: E.EACCES, message: 'a directory is not safe to use: a symlink, or owned or writable by another user' },
  ERR_CONTROL_PEER: { errno: E.EACCES, message: 'the control socket is served by another user' },
  ERR_BACKING_CONFINED: { errno: E.EACCES, message: 'a backing file lies outside --backing-confine, or is remote without --allow-remote' },
  ERR_JOB_NOT_FOUND: { errno: E.ENOENT, message: 'no job with that id' },
  ERR_JOB_STATE: { errno: E.EINVAL, message: 'the job is not in a state that allows this' },
} as const;

export type ErrorCode = keyof typeof ERROR_TABLE;

export interface VdiskErrorOptions {
  cause?: unknown;
}

export class VdiskError extends Error {
  readonly code: ErrorCode;
  readonly errno: number;

  constructor(code: ErrorCode, message?: string, options: VdiskErrorOptions = {}) {
    super(message ?? ERROR_TABLE[code].message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'VdiskError';
    this.code = code;
    this.errno = ERROR_TABLE[code].errno;
  }
}

/** The "please emulate" signal of drivers, as -ENOTSUP is in QEMU. */
export function notSupported(what: string): VdiskError {
  return new VdiskError('ENOTSUP', `${what} is not supported`);
}

export function isNotSupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

/** The errno for any thrown value: ours, Node's system errors, else EIO. */
export function errnoOf(err: unknown): number {
  if (err instanceof VdiskError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    const n = (E as Record<string, number | undefined>)[code];
    if (typeof n === 'number') return n;
  }
  return E.EIO;
}

/** The stable code for any thrown value (for one-line CLI errors). */
export function codeOf(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : 'EIO';
}
