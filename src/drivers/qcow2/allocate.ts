/**
 * Allocation and the write path: writes into clusters this image owns go
 * straight to the host file; others get new host clusters (whole clusters in
 * one run, without copying; partial ones with what the write does not cover
 * copied in), then their L2 entries are pointed at them, allocating or
 * un-sharing L2 tables as needed. Metadata changes stay in memory until flush.ts.
 */
import * as io from '../../block/io.js';
import { iovSlice, isZero } from '../../block/iov.js';
import { readL1Entry, subclusterKind, writeL1Entry, writeL2Entry, type L2Entry } from './l2-entry.js';
import { cachedEntryFor, entryFor, UNALLOCATED } from './cluster-map.js';
import { preadv } from './read.js';
import { flushIfCacheFull } from './flush.js';
import type { Qcow2State } from './state.js';


/** May a write to this range allocate? Without I/O: true whenever its L2 table is not cached. */
export function mayAllocate(s: Qcow2State, offset: number, bytes: number): boolean {
  for (let c = Math.floor(offset / s.clusterSize); c * s.clusterSize < offset + bytes; c++) {
    const e = cachedEntryFor(s, c);
    if (!e) return true;
    const from = Math.max(offset, c * s.clusterSize);
    const to = Math.min(offset + bytes, (c + 1) * s.clusterSize);
    if (!canWriteInPlace(s, e, from, to - from)) return true;
  }
  return false;
}

export async function pwritev(s: Qcow2State, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  s.checkWritable();
  const cs = s.clusterSize;
  for (let done = 0; done < bytes; ) {
    const pos = offset + done;
    // Whole clusters that need new host clusters: one allocation, one data write.
    if (pos % cs === 0 && bytes - done >= cs) {
      const written = await allocateWholeClusters(s, pos / cs, Math.floor((bytes - done) / cs), iovSlice(iov, done, bytes - done));
      if (written) {
        done += written;
        continue;
      }
    }
    const n = Math.min(bytes - done, cs - (pos % cs));
    await writeInCluster(s, pos, n, iovSlice(iov, done, n));
    done += n;
  }
  await flushIfCacheFull(s);
}

/**
 * Up to `max` guest clusters from `first` that the write covers entirely and
 * that cannot be written in place get one contiguous run of new host
 * clusters: nothing of their old contents survives, so nothing is copied.
 * Returns the bytes written (0: the first cluster is writable in place).
 */
async function allocateWholeClusters(s: Qcow2State, first: number, max: number, data: Buffer[]): Promise<number> {
  // Reserve under the lock, write the data without it (the request layer keeps
  // other writers of these guest clusters away), then link the clusters in.
  const plan = await s.metaLock.run(async () => {
    let n = 0;
    const old: L2Entry[] = [];
    while (n < max && n < 256) {
      const e = (await entryFor(s, first + n)) ?? UNALLOCATED;
      if (canWriteInPlace(s, e, (first + n) * s.clusterSize, s.clusterSize)) break;
      // Stay inside one L2 table so that the entries are updated in one go.
      if (n > 0 && Math.floor((first + n) / s.l2Entries) !== Math.floor(first / s.l2Entries)) break;
      old.push(e);
      n++;
    }
    if (!n) return null;
    // refcounts.allocate has checked the new run against the metadata ranges.
    const host = await s.refcounts.allocate(n);
    return { n, old, host };
  });
  if (!plan) return 0;
  const bytes = plan.n * s.clusterSize;
  await io.pwritev(s.file, plan.host.offset, bytes, iovSlice(data, 0, bytes));
  await s.metaLock.run(async () => {
    const { table, offset } = await l2TableForWrite(s, first);
    for (let i = 0; i < plan.n; i++) {
      writeL2Entry(table, (first + i) % s.l2Entries, s.extendedL2, {
        host: plan.host.offset + i * s.clusterSize,
        copied: true,
        allocMask: 0xffffffff,
        zeroMask: 0,
      });
    }
    s.l2Cache.markDirty(offset, table);
    for (const e of plan.old) freeOldCluster(s, e);
  });
  return bytes;
}

/** Write [offset, offset+bytes) inside one guest cluster. */
async function writeInCluster(s: Qcow2State, offset: number, bytes: number, data: Buffer[]): Promise<void> {
  const cluster = Math.floor(offset / s.clusterSize);
  const e = await entryFor(s, cluster);
  // entryFor has checked e's host cluster against the metadata ranges (checkEntry).
  if (e && canWriteInPlace(s, e, offset, bytes)) {
    return io.pwritev(s.file, e.host + (offset % s.clusterSize), bytes, data);
  }
  await s.metaLock.run(() => allocatingWrite(s, cluster, offset, bytes, data));
}

function canWriteInPlace(s: Qcow2State, e: L2Entry, offset: number, bytes: number): boolean {
  if (e.compressed || !e.host || !e.copied || e.zeroFlag) return false;
  if (!s.extendedL2) return true;
  const inCluster = offset % s.clusterSize;
  for (let sc = Math.floor(inCluster / s.subclusterSize); sc * s.subclusterSize < inCluster + bytes; sc++) {
    if (!(e.allocMask & 2 ** sc)) return false;
  }
  return true;
}

/**
 * A write that needs a new host cluster (or new subclusters): build the
 * cluster's new contents from the request and whatever it does not cover
 * (read through this node: old data, zeroes, compressed data or the backing),
 * write it, then point the L2 entry at it and drop the old cluster.
 */
export async function allocatingWrite(s: Qcow2State, cluster: number, offset: number, bytes: number, data: Buffer[]): Promise<void> {
  const cs = s.clusterSize;
  const scs = s.subclusterSize;
  const base = cluster * cs;
  const old = (await entryFor(s, cluster)) ?? UNALLOCATED;
  if (canWriteInPlace(s, old, offset, bytes)) {
    // Someone allocated it while we waited for the lock (entryFor checked it, as above).
    return io.pwritev(s.file, old.host + (offset - base), bytes, data);
  }

  // Which subclusters the new host cluster must hold valid data for.
  const first = Math.floor((offset - base) / scs);
  const last = Math.floor((offset + bytes - 1 - base) / scs);
  const nsc = cs / scs;
  const reuseHost = Boolean(old.host && old.copied && !old.compressed && s.extendedL2 && !old.zeroFlag);
  let keepMask = 0; // subclusters whose old data must be carried into a new cluster
  if (!reuseHost) {
    for (let sc = 0; sc < nsc; sc++) {
      if (sc >= first && sc <= last) continue;
      const kind = subclusterKind(old, sc, s.extendedL2);
      // Without subclusters every byte of the cluster lives in the new host cluster.
      if (!s.extendedL2 || kind === 'normal' || kind === 'compressed') keepMask |= 2 ** sc;
    }
  }

  // Both were checked against the metadata ranges: old.host by entryFor, a new one by refcounts.allocate.
  const host = reuseHost ? { offset: old.host, fresh: false } : await s.refcounts.allocate(1);
  // Assemble: the touched subclusters around the request, plus the kept ones.
  const buf = Buffer.alloc(cs);
  const segments: Array<[number, number]> = [];
  const addSegment = (from: number, to: number) => {
    const lastSeg = segments[segments.length - 1];
    if (lastSeg && lastSeg[1] === from) lastSeg[1] = to;
    else segments.push([from, to]);
  };
  for (let sc = 0; sc < nsc; sc++) {
    if ((sc >= first && sc <= last) || keepMask & 2 ** sc) addSegment(sc * scs, (sc + 1) * scs);
  }
  for (const [from, to] of segments) {
    // The old contents of the segment outside the request.
    const reqFrom = Math.max(from, offset - base);
    const reqTo = Math.min(to, offset + bytes - base);
    if (reqFrom > from) await preadv(s, base + from, reqFrom - from, [buf.subarray(from, reqFrom)]);
    if (reqTo < to) await preadv(s, base + Math.max(reqTo, from), to - Math.max(reqTo, from), [buf.subarray(Math.max(reqTo, from), to)]);
  }
  let pos = offset - base;
  for (const b of data) {
    b.copy(buf, pos);
    pos += b.length;
  }
  // Write the segments; on a fresh cluster (reads zero already) skip all-zero ones.
  for (const [from, to] of segments) {
    const seg = buf.subarray(from, to);
    if (host.fresh && isZero(seg)) continue;
    await io.pwritev(s.file, host.offset + from, to - from, [seg]);
  }
  // A cluster must lie inside the file even when nothing was written to its end.
  await coverInFile(s, host.offset + cs);

  // The data is written: now the L2 entry may point at it.
  let allocMask = old.allocMask;
  let zeroMask = old.zeroMask;
  if (s.extendedL2) {
    if (!reuseHost) allocMask = old.compressed ? 0 : old.host ? 0 : allocMask; // a new cluster holds only what we copied
    for (let sc = 0; sc < nsc; sc++) {
      if ((sc >= first && sc <= last) || keepMask & 2 ** sc) {
        allocMask |= 2 ** sc;
        zeroMask &= ~(2 ** sc);
      }
    }
  }
  await setL2Entry(s, cluster, { host: host.offset, copied: true, zeroFlag: false, allocMask: allocMask >>> 0, zeroMask: zeroMask >>> 0 });
  if (!reuseHost) freeOldCluster(s, old);
}

/** Grow the host file (sparsely) so that it reaches `end`. */
async function coverInFile(s: Qcow2State, end: number): Promise<void> {
  if (s.file.size() >= end) return;
  if (s.file.driver.truncate) await s.file.truncate(end);
  else await io.pwritev(s.file, end - 512, 512, [Buffer.alloc(512)]);
}

/** Drop the reference an old L2 entry held (after the new entry is durable). */
export function freeOldCluster(s: Qcow2State, old: L2Entry): void {
  if (old.compressed) {
    const first = Math.floor(old.compressedOffset / s.clusterSize);
    const last = Math.floor((old.compressedOffset + old.compressedBytes - 1) / s.clusterSize);
    for (let c = first; c <= last; c++) s.refcounts.deferFree(c * s.clusterSize);
  } else if (old.host) {
    s.refcounts.deferFree(old.host);
  }
}

/** Point guest cluster `cluster` at a new entry, allocating or un-sharing its L2 table first. */
export async function setL2Entry(s: Qcow2State, cluster: number, entry: { host: number; copied: boolean; zeroFlag?: boolean; allocMask?: number; zeroMask?: number }): Promise<void> {
  const { table, offset } = await l2TableForWrite(s, cluster);
  writeL2Entry(table, cluster % s.l2Entries, s.extendedL2, entry);
  s.l2Cache.markDirty(offset, table);
}

/**
 * The L2 table of `cluster`, ready to be changed: allocated if the L1 entry is
 * empty, copied first if it is shared with a snapshot. Callers change entries
 * synchronously and then mark it dirty.
 */
export async function l2TableForWrite(s: Qcow2State, cluster: number): Promise<{ table: Buffer; offset: number }> {
  const l1Index = Math.floor(cluster / s.l2Entries);
  const l1e = readL1Entry(s.l1, l1Index);
  if (!l1e.offset) {
    const { offset } = await s.refcounts.allocate(1);
    const table = Buffer.alloc(s.clusterSize);
    s.l2Cache.install(offset, table);
    s.metadataRanges.addTable(offset, s.clusterSize, 'L2 table');
    writeL1Entry(s.l1, l1Index, offset, true);
    s.l1Dirty = true;
    return { table, offset };
  }
  let table = await s.l2Cache.get(l1e.offset);
  if (l1e.copied) return { table, offset: l1e.offset };
  if ((await s.refcounts.get(l1e.offset / s.clusterSize)) === 1) {
    writeL1Entry(s.l1, l1Index, l1e.offset, true);
    s.l1Dirty = true;
    return { table, offset: l1e.offset };
  }
  // Shared with a snapshot: copy the table before changing it.
  const { offset } = await s.refcounts.allocate(1);
  table = Buffer.from(table);
  s.l2Cache.install(offset, table);
  s.refcounts.deferFree(l1e.offset);
  s.metadataRanges.addTable(offset, s.clusterSize, 'L2 table');
  writeL1Entry(s.l1, l1Index, offset, true);
  s.l1Dirty = true;
  return { table, offset };
}
