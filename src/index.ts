/**
 * vdisk as a library: what `import ... from 'vdisk'` gives.
 *
 * A thin facade over the block layer, so that the internals can move without
 * breaking users: open or create an image chain, do requests on its top node
 * (read, write, write-zeroes, discard, block status, flush, close), serve it as
 * one file through FUSE, and run jobs (stream) on it. Every failure is a
 * VdiskError with a stable `code` from ERROR_TABLE.
 *
 *   import { openImage, read, close } from 'vdisk';
 *   const disk = await openImage('overlay.qcow2', { copyOnRead: true });
 *   const head = await read(disk, 0, 4096);
 *   await close(disk);
 *
 * Offsets and lengths are bytes, as safe integers; requests need no alignment
 * (the request layer pads them) and must lie inside the disk.
 */
import fs from 'node:fs/promises';
import type { BlockNode } from './block/node.js';
import * as io from './block/io.js';
import { blockStatus as nodeStatus, blockStatusAbove, type BlockStatus } from './block/block-status.js';
import { openImage as openChain, probeFormat as probeImageFormat, type OpenOptions } from './drivers/chain.js';
import { chainOf as nodeChain } from './block/graph.js';
import { FORMAT_NAMES } from './drivers/registry.js';
import { createImage as createImageFile, type CreateImageOptions, type CreatedImage } from './create.js';
import type { HttpOptions } from './drivers/http/index.js';
import { imageStats as chainStats, type ImageStats } from './stats.js';
import { checkMountpoint } from './export/mountpoint.js';
import { FuseExport, type ExportOptions } from './export/fuse-export.js';
import { JobRunner } from './jobs/runner.js';
import { startStream, type StreamResult } from './jobs/stream.js';
import type { Job } from './jobs/job.js';
import { VdiskError } from './errors.js';

// ---------------------------------------------------------------------------
// Types that are already right where they are: re-exported as they are.

export { VdiskError, ERROR_TABLE, errnoOf, codeOf, type ErrorCode } from './errors.js';
export type { BlockNode, CopyOnReadStats, DetectZeroes, DiscardMode } from './block/node.js';
export type { BlockStatus } from './block/block-status.js';
export type { HttpOptions, HttpStats } from './drivers/http/index.js';
export type { CreateImageOptions, CreatedImage, Qcow2FormatOptions } from './create.js';
export type { ImageStats } from './stats.js';
export { FuseExport, type ExportOptions, type ExportStats } from './export/fuse-export.js';
export { Job, type JobInfo, type JobState, type JobStatus, type JobProgress, type JobEvents, type JobAction } from './jobs/job.js';
export { JobRunner } from './jobs/runner.js';
export type { StreamResult } from './jobs/stream.js';

// ---------------------------------------------------------------------------
// Opening and creating images

/** The image formats vdisk opens and creates. */
export const IMAGE_FORMATS: readonly string[] = FORMAT_NAMES;

/**
 * How to open an image chain; every field is optional. As the open path's own
 * options, but `backingConfine.dir` may be any path (it is resolved here).
 */
export interface OpenImageOptions extends Omit<OpenOptions, 'backingConfine'> {
  /** Backing files must resolve (symlinks followed) inside `dir`; URLs only with `allowRemote`. */
  backingConfine?: { dir: string; allowRemote?: boolean };
}

/**
 * Open an image file or http(s) URL as the top node of its backing chain.
 * Close it with close() when done: that flushes and releases the whole chain.
 */
export async function openImage(file: string, options: OpenImageOptions = {}): Promise<BlockNode> {
  const { backingConfine, ...rest } = options;
  let confine: { dir: string; allowRemote: boolean } | undefined;
  if (backingConfine) {
    // The open path compares resolved paths, so the directory must be resolved too.
    const dir = await fs.realpath(backingConfine.dir).catch(() => {
      throw new VdiskError('EINVAL', `backingConfine: ${backingConfine.dir} does not exist`);
    });
    confine = { dir, allowRemote: Boolean(backingConfine.allowRemote) };
  }
  return openChain(file, { ...rest, ...(confine ? { backingConfine: confine } : {}) });
}

/**
 * Create an image: raw (`size` needed), or qcow2, optionally on a backing file
 * or URL (whose size it takes when `size` is absent). The file appears whole or
 * not at all; an existing one is an EEXIST error unless `overwrite`.
 */
export function createImage(file: string, options: CreateImageOptions = {}): Promise<CreatedImage> {
  return createImageFile(file, options);
}

/** The format an image file's first bytes name ('raw' when none matches). */
export function probeFormat(file: string): Promise<string> {
  return probeImageFormat(file);
}

/** The nodes of a chain, top first (the top, its backing, that one's backing, ...). */
export function chainOf(top: BlockNode): BlockNode[] {
  return nodeChain(top);
}

// ---------------------------------------------------------------------------
// Requests on a node

/** Read `length` bytes at `offset` into a new buffer. */
export async function read(node: BlockNode, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await io.preadv(node, offset, length, [buf]);
  return buf;
}

/** Read into `target` (one buffer, or a list filled in order) from `offset`. */
export async function readInto(node: BlockNode, offset: number, target: Buffer | Buffer[]): Promise<void> {
  const iov = Array.isArray(target) ? target : [target];
  await io.preadv(node, offset, byteLength(iov), iov);
}

/** Write `data` (one buffer, or a list written in order) at `offset`. The buffers are not modified. */
export async function write(node: BlockNode, offset: number, data: Buffer | Buffer[]): Promise<void> {
  const iov = Array.isArray(data) ? data : [data];
  await io.pwritev(node, offset, byteLength(iov), iov);
}

/** Options of writeZeroes(). */
export interface WriteZeroesOptions {
  /** The node may free the space (the range still reads as zero, whatever the backing chain holds). */
  mayUnmap?: boolean;
}

/** Make `length` bytes at `offset` read as zero, without sending zeroes where the format has zero clusters. */
export async function writeZeroes(node: BlockNode, offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
  await io.pwriteZeroes(node, offset, length, { mayUnmap: Boolean(options.mayUnmap) });
}

/**
 * Tell the node `length` bytes at `offset` are no longer needed. Advisory:
 * afterwards the range may read as anything (use writeZeroes with mayUnmap for
 * "free it and read zero"); dropped when the node was opened with discard 'ignore'.
 */
export async function discard(node: BlockNode, offset: number, length: number): Promise<void> {
  await io.pdiscard(node, offset, length);
}

/** Options of blockStatus(). */
export interface BlockStatusOptions {
  /**
   * true (the default): what the chain from this node down makes of the range
   * (the first node that defines it answers); false: this node alone.
   */
  chain?: boolean;
  /** With `chain`: stop above this backing node (it and those below it do not count). */
  base?: BlockNode | null;
}

/**
 * What a prefix of [offset, offset+length) is: allocated (and by which node),
 * reads as zero, holds data. The answer's `bytes` says how long that prefix is;
 * ask again from offset+bytes for the rest. `offset` must be inside the disk.
 */
export function blockStatus(node: BlockNode, offset: number, length: number, options: BlockStatusOptions = {}): Promise<BlockStatus> {
  if (options.chain === false) return nodeStatus(node, offset, length);
  return blockStatusAbove(node, offset, length, options.base ?? null);
}

/** Make every completed write to this node durable (its host file synced). */
export async function flush(node: BlockNode): Promise<void> {
  await io.flush(node);
}

/**
 * Resolves once no request is in flight on the node, counting the copies
 * copy-on-read writes into it after a read has already been answered.
 */
export async function drain(node: BlockNode): Promise<void> {
  await node.drain();
}

/**
 * Wait for requests in flight, then close the node and its backing chain
 * (a qcow2 image writes out its metadata). Flush first for writes that must
 * survive a crash of the machine.
 */
export async function close(node: BlockNode): Promise<void> {
  await node.close();
}

/** Counters of an open chain (a copy): copy-on-read on the top node, and what its http(s) nodes fetched. */
export function imageStats(top: BlockNode): ImageStats {
  return chainStats(top);
}

function byteLength(iov: readonly Buffer[]): number {
  return iov.reduce((n, b) => n + b.length, 0);
}

// ---------------------------------------------------------------------------
// Serving a node as one file (FUSE)

/**
 * Mount `node` on `mountpoint` (an existing regular file, which shows the disk
 * while mounted) and serve it from this process's event loop. Needs root or
 * fusermount3, and the native addon built at install. Stop with
 * `exp.stop()`, then close the node; `exp.ended` resolves when the kernel ends
 * the session (someone unmounted it).
 */
export async function mount(node: BlockNode, mountpoint: string, options: Omit<ExportOptions, 'mountpoint'> = {}): Promise<FuseExport> {
  // First, for a clearer error than the mount's own (already mounted, not a regular file).
  await checkMountpoint(mountpoint);
  return FuseExport.start(node, { ...options, mountpoint });
}

// ---------------------------------------------------------------------------
// Jobs

/** The runner jobs go to when no other is given: one per process. */
export const jobs = new JobRunner();

/** Options of stream(). */
export interface StreamJobOptions {
  /** When done, drop the backing file from the image's header (and close the chain below). */
  dropBacking?: boolean;
  /** Bytes/s copied; 0 or absent: as fast as it goes. */
  rateLimit?: number;
  /** Where the job is listed; default `jobs`. */
  runner?: JobRunner;
}

/**
 * Start a stream job: copy into the (qcow2, writable) top image everything it
 * still reads from its backing chain, while the node stays in use. Await
 * `job.concluded`, then read `job.result` (or `job.failure`); pause, resume and
 * cancel it through the job. A cancelled stream resumes where it stopped when
 * started again.
 */
export function stream(node: BlockNode, options: StreamJobOptions = {}): Job<StreamResult> {
  const { runner = jobs, ...rest } = options;
  return startStream(runner, node, rest);
}
