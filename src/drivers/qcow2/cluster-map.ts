/**
 * The cluster map: where a guest offset lives (L1 -> L2 entry -> host
 * cluster, zero, compressed or the backing node), and block status over it.
 * Lookups whose L2 table is cached answer without awaiting anything.
 */
import type { DriverBlockStatus } from '../../block/driver.js';
import { VdiskError } from '../../errors.js';
import { readL1Entry, readL2Entry, subclusterKind, type ClusterKind, type L2Entry } from './l2-entry.js';
import type { Qcow2State } from './state.js';

/** What an unmapped cluster looks like. */
export const UNALLOCATED: L2Entry = Object.freeze({ host: 0, copied: false, compressed: false, zeroFlag: false, allocMask: 0, zeroMask: 0, compressedOffset: 0, compressedBytes: 0 });

/** A run of guest bytes inside one cluster that all read the same way. */
export interface Piece {
  kind: ClusterKind;
  bytes: number;
  /** Host offset of the first byte, for normal pieces. */
  host: number;
  entry: L2Entry;
}

/** The L2 table for guest cluster `cluster`, or null when the L1 entry is empty. */
async function l2For(s: Qcow2State, cluster: number): Promise<{ table: Buffer; offset: number } | null> {
  const l1Index = Math.floor(cluster / s.l2Entries);
  if (l1Index >= s.header.l1Size) return null;
  const { offset } = readL1Entry(s.l1, l1Index);
  if (!offset) return null;
  return { table: await s.l2Cache.get(offset), offset };
}

export async function entryFor(s: Qcow2State, cluster: number): Promise<L2Entry | null> {
  const cached = cachedEntryFor(s, cluster);
  return cached !== undefined ? cached : loadEntry(s, cluster);
}

/** The entry, reading its L2 table into the cache. */
async function loadEntry(s: Qcow2State, cluster: number): Promise<L2Entry | null> {
  const l2 = await l2For(s, cluster);
  if (!l2) return null;
  const e = readL2Entry(l2.table, cluster % s.l2Entries, s.extendedL2, s.clusterBits);
  checkEntry(s, e, cluster);
  return e;
}

/** The entry without I/O: null if unmapped, undefined if its L2 table is not cached. */
export function cachedEntryFor(s: Qcow2State, cluster: number): L2Entry | null | undefined {
  const l1Index = Math.floor(cluster / s.l2Entries);
  if (l1Index >= s.header.l1Size) return null;
  const { offset } = readL1Entry(s.l1, l1Index);
  if (!offset) return null;
  const table = s.l2Cache.peek(offset);
  if (!table) return undefined;
  const e = readL2Entry(table, cluster % s.l2Entries, s.extendedL2, s.clusterBits);
  checkEntry(s, e, cluster);
  return e;
}

export function checkEntry(s: Qcow2State, e: L2Entry, cluster: number): void {
  const end = Math.max(s.refcounts.fileEnd, s.file.size());
  if (e.compressed) {
    if (e.compressedOffset + e.compressedBytes > end + s.clusterSize || e.compressedBytes > 2 * s.clusterSize + 512) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster ${cluster} points outside the file`);
    }
  } else if (e.host) {
    if (e.host % s.clusterSize !== 0) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L2 entry of cluster ${cluster} has unaligned offset ${e.host}`);
    if (e.host + s.clusterSize > end) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L2 entry of cluster ${cluster} points past the end of the file (${e.host})`);
    s.metadataRanges.assertFree(e.host, s.clusterSize, `the data of guest cluster ${cluster}`);
  }
}

/** The longest prefix of [offset, offset+bytes) inside one cluster with one kind. */
export async function piece(s: Qcow2State, offset: number, bytes: number): Promise<Piece> {
  const cluster = Math.floor(offset / s.clusterSize);
  const cached = cachedEntryFor(s, cluster);
  // The common case (L2 table cached) answers without awaiting anything.
  return pieceOf(s, offset, bytes, cached === undefined ? await loadEntry(s, cluster) : cached);
}

function pieceOf(s: Qcow2State, offset: number, bytes: number, found: L2Entry | null): Piece {
  const inCluster = offset % s.clusterSize;
  const entry = found ?? UNALLOCATED;
  const clusterRest = Math.min(bytes, s.clusterSize - inCluster);
  const sc = Math.floor(inCluster / s.subclusterSize);
  const kind = subclusterKind(entry, sc, s.extendedL2);
  let n = Math.min(clusterRest, (sc + 1) * s.subclusterSize - inCluster);
  for (let next = sc + 1; n < clusterRest && subclusterKind(entry, next, s.extendedL2) === kind; next++) {
    n = Math.min(clusterRest, (next + 1) * s.subclusterSize - inCluster);
  }
  return { kind, bytes: n, host: kind === 'normal' ? entry.host + inCluster : 0, entry };
}

/**
 * One answer covers a run of empty L1 entries, or a run of one kind within
 * one L2 table (read once, then scanned without I/O): the cost of walking a
 * disk follows its allocated metadata, not its virtual size.
 */
export async function blockStatus(s: Qcow2State, offset: number, bytes: number): Promise<DriverBlockStatus> {
  const tableSpan = s.clusterSize * s.l2Entries;
  const end = offset + bytes;
  let l1Index = Math.floor(offset / tableSpan);
  while (l1Index < s.header.l1Size && l1Index * tableSpan < end && !readL1Entry(s.l1, l1Index).offset) l1Index++;
  const unmappedEnd = l1Index >= s.header.l1Size ? end : Math.min(end, l1Index * tableSpan);
  if (unmappedEnd > offset) return { bytes: unmappedEnd - offset, allocated: false, zero: !s.backing, data: false };
  const table = await s.l2Cache.get(readL1Entry(s.l1, l1Index).offset);
  const tableEnd = Math.min(end, (l1Index + 1) * tableSpan);
  const pieceAt = (pos: number): Piece => {
    const cluster = Math.floor(pos / s.clusterSize);
    const e = readL2Entry(table, cluster % s.l2Entries, s.extendedL2, s.clusterBits);
    checkEntry(s, e, cluster);
    return pieceOf(s, pos, tableEnd - pos, e);
  };
  const p = pieceAt(offset);
  let n = p.bytes;
  // Extend over following pieces of the same kind (and contiguous host offsets).
  while (offset + n < tableEnd) {
    const q = pieceAt(offset + n);
    if (q.kind !== p.kind || (p.kind === 'normal' && q.host !== p.host + n)) break;
    n += q.bytes;
  }
  switch (p.kind) {
    case 'normal':
      return { bytes: n, allocated: true, zero: false, data: true, hostOffset: p.host };
    case 'compressed':
      return { bytes: n, allocated: true, zero: false, data: true };
    case 'zero':
      return { bytes: n, allocated: true, zero: true, data: false };
    default:
      return { bytes: n, allocated: false, zero: !s.backing, data: false };
  }
}
