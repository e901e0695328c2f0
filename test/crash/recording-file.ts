/**
 * A power cut, simulated: a pass-through node under the qcow2 driver that
 * records every write, zeroing, truncate and flush the driver issues to its
 * host file, and a replay that builds the host file as a disk could have left
 * it had the power gone at a chosen point of that log.
 *
 * Where the recording sits, and why: the issue asks for a pass-through
 * filesystem under the image's directory. vdisk's own FUSE export cannot be
 * that filesystem (it exports a file of fixed size, and a qcow2 host file
 * grows), and a FUSE-in-FUSE stack would add a second server process per
 * trial for nothing the log needs. What matters is the sequence of writes and
 * syncs vdisk's qcow2 driver issues to its host file, and that is exactly
 * what a node between the driver and its FileDriver sees (as QEMU's
 * blklogwrites filter does). The guest side is still a real FUSE mount of the
 * qcow2 node, driven by pwrite/fallocate/fsync, so a guest fsync is the real
 * FUSE fsync path of vdisk.
 *
 * Replay model of a power cut at log position C (ext4 with data=ordered, or a
 * disk with a volatile write cache, behaves within it):
 *  - everything a completed flush covered (what had completed when the flush
 *    was issued) survives;
 *  - of each later write, any subset of its 4 KiB pages survives (chosen by the
 *    caller), applied in log order, so an older page never lands over a newer one;
 *  - a later truncate survives or not as a whole.
 */
import type { BlockDriver, DriverBlockStatus, ZeroFlags } from '../../src/block/driver.js';
import type { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { blockStatus } from '../../src/block/block-status.js';

export const PAGE = 4096;

export type LogRecord =
  | { kind: 'write'; offset: number; data: Buffer }
  /** Write-zeroes or discard on the host file: the range reads as zero afterwards. */
  | { kind: 'zero'; offset: number; bytes: number }
  | { kind: 'truncate'; size: number }
  /** A completed flush: records [0, covers) are durable. */
  | { kind: 'flush'; covers: number };

export class RecordingFile implements BlockDriver {
  readonly formatName = 'recording';
  readonly readOnly = false;
  readonly growable = true;
  readonly child: BlockNode;
  readonly log: LogRecord[] = [];

  constructor(child: BlockNode) {
    this.child = child;
  }

  get limits() {
    return this.child.limits;
  }

  size(): number {
    return this.child.size();
  }

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    await io.preadv(this.child, offset, bytes, iov);
  }

  async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    const data = Buffer.concat(iov, bytes); // what was asked for, before the caller reuses its buffers
    await io.pwritev(this.child, offset, bytes, iov);
    // Logged on completion: a flush issued later covers it.
    this.log.push({ kind: 'write', offset, data });
  }

  async pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    await io.pwriteZeroes(this.child, offset, bytes, flags);
    this.log.push({ kind: 'zero', offset, bytes });
  }

  async pdiscard(offset: number, bytes: number): Promise<void> {
    await io.pdiscard(this.child, offset, bytes);
    this.log.push({ kind: 'zero', offset, bytes });
  }

  async truncate(size: number): Promise<void> {
    await this.child.driver.truncate!(size);
    this.log.push({ kind: 'truncate', size });
  }

  async blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    const st = await blockStatus(this.child, offset, bytes);
    return { bytes: st.bytes, allocated: st.allocated, zero: st.zero, data: st.data };
  }

  async flush(): Promise<void> {
    const covers = this.log.length;
    // The host file itself need not reach the disk: the replay decides what survives.
    this.log.push({ kind: 'flush', covers });
  }

  async allocatedBytes(): Promise<number> {
    return (await this.child.driver.allocatedBytes?.()) ?? 0;
  }

  async close(): Promise<void> {
    await this.child.close();
  }
}

/** How many records the last completed flush before position `crash` made durable. */
export function durablePrefix(log: LogRecord[], crash: number): number {
  let durable = 0;
  for (let i = 0; i < crash; i++) {
    const r = log[i]!;
    if (r.kind === 'flush') durable = Math.max(durable, r.covers);
  }
  return durable;
}

/**
 * The host file after a power cut at log position `crash`, starting from
 * `base` (the file before the log began). `survives(record, page)` says
 * whether a page of an unsynced record reached the disk (page -1: a truncate).
 */
export function replay(base: Buffer, log: LogRecord[], crash: number, survives: (record: number, page: number) => boolean): Buffer {
  const durable = durablePrefix(log, crash);
  let cap = base.length;
  for (let i = 0; i < crash; i++) {
    const r = log[i]!;
    if (r.kind === 'write') cap = Math.max(cap, r.offset + r.data.length);
    if (r.kind === 'truncate') cap = Math.max(cap, r.size);
  }
  const img = Buffer.alloc(cap);
  base.copy(img);
  let size = base.length;
  for (let i = 0; i < crash; i++) {
    const r = log[i]!;
    const keep = (page: number) => i < durable || survives(i, page);
    if (r.kind === 'write' || r.kind === 'zero') {
      const end = r.kind === 'write' ? r.offset + r.data.length : Math.min(r.offset + r.bytes, size);
      for (let p = Math.floor(r.offset / PAGE); p * PAGE < end; p++) {
        if (!keep(p)) continue;
        const from = Math.max(r.offset, p * PAGE);
        const to = Math.min(end, (p + 1) * PAGE);
        if (r.kind === 'write') r.data.copy(img, from, from - r.offset, to - r.offset);
        else img.fill(0, from, to);
        size = Math.max(size, to);
      }
    } else if (r.kind === 'truncate' && keep(-1)) {
      if (r.size < size) img.fill(0, r.size, size);
      size = r.size;
    }
  }
  return img.subarray(0, size);
}
