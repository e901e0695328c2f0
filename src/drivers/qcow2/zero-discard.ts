/**
 * Write-zeroes and discard as metadata: zero clusters (or zero subclusters)
 * instead of written zeroes, freed host clusters where nothing below shows through.
 */
import type { ZeroFlags } from '../../block/driver.js';
import { chainReadsZero } from '../../block/block-status.js';
import { notSupported } from '../../errors.js';
import { readL2Entry, writeL2Entry, type L2Entry } from './l2-entry.js';
import { checkEntry, entryFor, UNALLOCATED } from './cluster-map.js';
import { preadv } from './read.js';
import { allocatingWrite, freeOldCluster, l2TableForWrite, setL2Entry } from './allocate.js';
import { flushIfCacheFull } from './flush.js';
import type { Qcow2State } from './state.js';

/**
 * Whole clusters (or subclusters) become zero in metadata. A partial cluster
 * becomes a zero cluster if the rest of it already reads as zero through the
 * whole chain, so zeroing a misaligned range over unwritten space allocates
 * nothing; otherwise its zeroes are written as data.
 */
export async function pwriteZeroes(s: Qcow2State, offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
  s.checkWritable();
  // v2 has no zero clusters: a range zero below stays unallocated, reading through.
  if (flags.allocate && s.header.version === 2) throw notSupported('zero clusters in a compat=0.10 image');
  const cs = s.clusterSize;
  const unit = s.subclusterSize;
  const mayUnmap = Boolean(flags.mayUnmap);
  for (let done = 0; done < bytes; ) {
    const pos = offset + done;
    const cluster = Math.floor(pos / cs);
    // v3: whole clusters become zero clusters a table at a time, without per-cluster awaits.
    if (s.header.version === 3 && pos % cs === 0 && bytes - done >= cs) {
      const n = await s.metaLock.run(() => zeroWholeClusters(s, cluster, Math.floor((bytes - done) / cs), mayUnmap));
      done += n * cs;
      await flushIfCacheFull(s);
      continue;
    }
    const n = Math.min(bytes - done, (cluster + 1) * cs - pos);
    await s.metaLock.run(() => zeroInCluster(s, cluster, pos, n, mayUnmap, unit));
    done += n;
  }
  await flushIfCacheFull(s);
}

/** Zero up to `max` whole clusters from `first`, within one L2 table; returns how many. */
async function zeroWholeClusters(s: Qcow2State, first: number, max: number, mayUnmap: boolean): Promise<number> {
  const n = Math.min(max, s.l2Entries - (first % s.l2Entries));
  const { table, offset } = await l2TableForWrite(s, first);
  for (let i = 0; i < n; i++) {
    const index = (first + i) % s.l2Entries;
    const old = readL2Entry(table, index, s.extendedL2, s.clusterBits);
    checkEntry(s, old, first + i);
    // Keep a host cluster we own unless asked to unmap (preallocated zeroes).
    const keepHost = !mayUnmap && Boolean(old.host) && old.copied && !old.compressed;
    if (s.extendedL2) {
      writeL2Entry(table, index, true, { host: keepHost ? old.host : 0, copied: keepHost, allocMask: 0, zeroMask: 0xffffffff });
    } else {
      writeL2Entry(table, index, false, { host: keepHost ? old.host : 0, copied: keepHost, zeroFlag: true });
    }
    if (!keepHost) freeOldCluster(s, old);
  }
  s.l2Cache.markDirty(offset, table);
  return n;
}

async function zeroInCluster(s: Qcow2State, cluster: number, offset: number, bytes: number, mayUnmap: boolean, unit: number): Promise<void> {
  const base = cluster * s.clusterSize;
  const old = (await entryFor(s, cluster)) ?? UNALLOCATED;
  // The request layer hands whole units only (pwriteZeroesAlignment); the last one may end at the end of the image.
  const from = offset - base;
  let to = from + bytes;
  if (offset + bytes === s.header.size) to = Math.min(s.clusterSize, Math.ceil(to / unit) * unit);
  if (s.header.version === 2) return zeroV2(s, cluster, old, from, to);
  // A whole cluster (always so without subclusters: unit = cluster) is the table-at-a-time case.
  if (from === 0 && to === s.clusterSize) {
    await zeroWholeClusters(s, cluster, 1, mayUnmap);
    return;
  }
  // Part of a cluster with subclusters.
  if (old.compressed) {
    // Compressed clusters have no subclusters: the untouched part must survive as data.
    const rest = Buffer.alloc(s.clusterSize);
    await preadv(s, base, s.clusterSize, [rest]);
    rest.fill(0, from, to);
    await allocatingWrite(s, cluster, base, s.clusterSize, [rest]);
    return;
  }
  let allocMask = old.allocMask;
  let zeroMask = old.zeroMask;
  for (let sc = from / unit; sc < to / unit; sc++) {
    allocMask &= ~(2 ** sc);
    zeroMask |= 2 ** sc;
  }
  const freeHost = allocMask === 0 && (mayUnmap || !old.copied);
  await setL2Entry(s, cluster, {
    host: freeHost ? 0 : old.host,
    copied: !freeHost && old.copied && Boolean(old.host),
    allocMask: allocMask >>> 0,
    zeroMask: zeroMask >>> 0,
  });
  if (freeHost) freeOldCluster(s, old);
}

/** Version 2 has no zero flag: unallocated reads zero only if nothing below shows through. */
async function zeroV2(s: Qcow2State, cluster: number, old: L2Entry, from: number, to: number): Promise<void> {
  const base = cluster * s.clusterSize;
  const backingZero = await chainReadsZero(s.backing, base, s.clusterSize);
  if (backingZero) {
    if (old.host || old.compressed) {
      await setL2Entry(s, cluster, { host: 0, copied: false });
      freeOldCluster(s, old);
    }
    return;
  }
  await allocatingWrite(s, cluster, base + from, to - from, [Buffer.alloc(to - from)]);
}

/**
 * Free whole clusters: they become unallocated and read through to the
 * backing node (discardLeaves). Whether that leaves zeroes is the request
 * layer's question (io.discardLeavesZeroes), not this driver's.
 */
export async function pdiscard(s: Qcow2State, offset: number, bytes: number): Promise<void> {
  s.checkWritable();
  for (let pos = offset; pos < offset + bytes; pos += s.clusterSize) {
    const cluster = Math.floor(pos / s.clusterSize);
    await s.metaLock.run(async () => {
      const old = await entryFor(s, cluster);
      if (!old || (!old.host && !old.compressed && !old.zeroFlag && !old.zeroMask)) return;
      await setL2Entry(s, cluster, { host: 0, copied: false });
      freeOldCluster(s, old);
    });
  }
  await flushIfCacheFull(s);
}
