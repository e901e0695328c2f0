/**
 * The stream job: copy into the top image everything it still takes from its
 * backing chain (zero ranges as zero clusters, not data), so that the backing
 * chain can be dropped. Already-copied clusters are skipped, so an interrupted
 * stream resumes where it stopped. It runs through the request layer, so it
 * can run inside a mount while the disk is in use.
 */
import type { BlockNode } from '../block/node.js';
import * as io from '../block/io.js';
import { blockStatus } from '../block/block-status.js';
import { Qcow2Driver } from '../drivers/qcow2/index.js';
import { VdiskError } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('stream');

/** Work per step: bounded, so progress is smooth and Ctrl-C is prompt. */
const STEP_BYTES = 8 * 1024 * 1024;

export interface StreamProgress {
  /** Bytes of the disk examined so far. */
  done: number;
  total: number;
  /** Bytes copied into the top image (data or zero clusters) so far. */
  copied: number;
}

export interface StreamOptions {
  dropBacking?: boolean;
  onProgress?: (p: StreamProgress) => void;
  signal?: AbortSignal;
}

export interface StreamResult extends StreamProgress {
  droppedBacking: boolean;
  interrupted: boolean;
}

export async function streamImage(top: BlockNode, options: StreamOptions = {}): Promise<StreamResult> {
  if (!(top.driver instanceof Qcow2Driver)) throw new VdiskError('ERR_IMAGE_FORMAT', 'stream works on qcow2 images');
  const total = top.size();
  const progress: StreamProgress = { done: 0, total, copied: 0 };
  if (!top.backing) {
    return { ...progress, done: total, droppedBacking: false, interrupted: false };
  }
  for (let pos = 0; pos < total; ) {
    if (options.signal?.aborted) {
      await io.flush(top);
      return { ...progress, droppedBacking: false, interrupted: true };
    }
    const st = await blockStatus(top, pos, Math.min(STEP_BYTES, total - pos));
    if (!st.allocated) {
      await io.copyFromBacking(top, pos, st.bytes);
      progress.copied += st.bytes;
    }
    pos += st.bytes;
    progress.done = pos;
    options.onProgress?.({ ...progress });
  }
  await io.flush(top);
  trace('streamed copied=%d of %d', progress.copied, total);
  let droppedBacking = false;
  if (options.dropBacking) {
    await dropBacking(top);
    droppedBacking = true;
  }
  return { ...progress, droppedBacking, interrupted: false };
}

/** After a complete stream: the image no longer needs its backing file; say so in its header. */
async function dropBacking(top: BlockNode): Promise<void> {
  const drv = top.driver as Qcow2Driver;
  for (let pos = 0; pos < top.size(); ) {
    const st = await blockStatus(top, pos, top.size() - pos);
    if (!st.allocated) throw new VdiskError('EIO', `stream: ${top.name} still lacks data at ${pos}; not dropping the backing file`);
    pos += st.bytes;
  }
  // Clusters a guest write allocated since the stream's flush must be on disk before the header stops naming the backing file.
  await io.flush(top);
  const old = await drv.dropBackingFile();
  top.backing = null;
  await old?.close();
  trace('backing file dropped from %s', top.name);
}
