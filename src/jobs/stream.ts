/**
 * The stream job: copy into the top image everything it still takes from its
 * backing chain (zero ranges as zero clusters, not data), so that the backing
 * chain can be dropped. Already-copied clusters are skipped, so an interrupted
 * (cancelled) stream resumes where it stopped. It runs through the request
 * layer, so it can run inside a mount while the disk is in use.
 */
import type { BlockNode } from '../block/node.js';
import * as io from '../block/io.js';
import { blockStatus } from '../block/block-status.js';
import { changeBackingFile } from '../block/graph.js';
import { VdiskError } from '../errors.js';
import { tracer } from '../trace.js';
import type { Job } from './job.js';
import type { JobRunner } from './runner.js';

const trace = tracer('stream');

/** Work per step: bounded, so progress is smooth and Ctrl-C is prompt. */
const STEP_BYTES = 8 * 1024 * 1024;
/** The smallest step under a rate limit; a power of two, so steps stay cluster-aligned for clusters up to it. */
const MIN_STEP_BYTES = 64 * 1024;

export interface StreamProgress {
  /** Bytes of the disk examined so far. */
  done: number;
  total: number;
  /** Bytes copied into the top image (data or zero clusters) so far. */
  copied: number;
}

export interface StreamOptions {
  dropBacking?: boolean;
  /** Bytes/s copied; 0 or absent: no limit. */
  rateLimit?: number;
}

export interface StreamResult extends StreamProgress {
  droppedBacking: boolean;
  /** Cancelled (Ctrl-C, `vdisk job cancel`, the mount stopping): run it again to resume. */
  interrupted: boolean;
}

export const STREAM_JOB = 'stream';

/**
 * Start a stream job on `top` in `runner`. One stream per image at a time
 * (EBUSY); one still winding down after a cancel is waited for, so a stream
 * restarted right after Ctrl-C starts when the old one has stopped.
 */
export function startStream(runner: JobRunner, top: BlockNode, options: StreamOptions = {}): Job<StreamResult> {
  // Streaming is for images that stand on a backing file and can stop naming it.
  if (!top.driver.changeBackingFile) throw new VdiskError('ERR_IMAGE_FORMAT', `stream works on images with a backing file (${top.driver.formatName} has none)`);
  const others = runner.live().filter((j) => j.type === STREAM_JOB && j.target === top.name);
  const running = others.find((j) => !j.cancelled);
  if (running) throw new VdiskError('EBUSY', `a stream job is already running on this image (${running.id})`);
  const stopping = others.map((j) => j.concluded);
  return runner.start(
    STREAM_JOB,
    top.name,
    async (job) => {
      await Promise.all(stopping);
      return streamBody(top, job, Boolean(options.dropBacking));
    },
    { rateLimit: options.rateLimit },
  );
}

/** A job's StreamProgress, as the bar and the result show it. */
export function streamProgressOf(p: { current: number; total: number; copied?: number }): StreamProgress {
  return { done: p.current, total: p.total, copied: p.copied ?? 0 };
}

async function streamBody(top: BlockNode, job: Job<StreamResult>, dropBacking: boolean): Promise<StreamResult> {
  const total = top.size();
  const progress: StreamProgress = { done: 0, total, copied: 0 };
  job.setProgress(0, total, 0);
  if (!top.backing) {
    job.setProgress(total, total, 0);
    return { ...progress, done: total, droppedBacking: false, interrupted: false };
  }
  let moved = 0;
  for (let pos = 0; pos < total; ) {
    if (!(await job.pausePoint(moved))) {
      await io.flush(top);
      return { ...progress, droppedBacking: false, interrupted: true };
    }
    moved = 0;
    const step = job.chunkBytes(MIN_STEP_BYTES, STEP_BYTES);
    const st = await blockStatus(top, pos, Math.min(step, total - pos));
    if (!st.allocated) {
      await io.copyFromBacking(top, pos, st.bytes);
      progress.copied += st.bytes;
      moved = st.bytes;
    }
    pos += st.bytes;
    progress.done = pos;
    job.setProgress(progress.done, total, progress.copied);
  }
  await io.flush(top);
  trace('streamed copied=%d of %d', progress.copied, total);
  if (dropBacking) await dropBackingFile(top);
  return { ...progress, droppedBacking: dropBacking, interrupted: false };
}

/** After a complete stream: the image no longer needs its backing file; say so in its header. */
async function dropBackingFile(top: BlockNode): Promise<void> {
  for (let pos = 0; pos < top.size(); ) {
    const st = await blockStatus(top, pos, top.size() - pos);
    if (!st.allocated) throw new VdiskError('EIO', `stream: ${top.name} still lacks data at ${pos}; not dropping the backing file`);
    pos += st.bytes;
  }
  // Clusters a guest write allocated since the stream's flush must be on disk before the header stops naming the backing file.
  await io.flush(top);
  const old = await changeBackingFile(top, null, null, null);
  await old?.close();
  trace('backing file dropped from %s', top.name);
}
