/**
 * Where a qcow2 image keeps its metadata, as a sorted set of host cluster
 * runs, so that every allocation, data cluster and table pointer can be
 * checked against it (QEMU's overlap checks, qcow2_check_metadata_overlap).
 * A data write or a table placed over other metadata destroys the image
 * (a refcount update landing in an L2 table drops fsync'd mappings), so an
 * overlap is a corruption: the driver marks the image corrupt and stops writing.
 *
 * Cost: memory and lookups grow with the runs of real metadata (binary
 * search), never with how often a table is referenced: an L2 table named by
 * a million L1 entries is one run.
 */
import * as io from '../../block/io.js';
import type { BlockNode } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { MAX_L1_BYTES } from './header.js';
import { readL1Entry } from './l2-entry.js';

export type MetadataKind = 'header' | 'L1 table' | 'L2 table' | 'refcount table' | 'refcount block' | 'snapshot table' | 'snapshot L1 table';

/**
 * Kinds that several pointers may legitimately name (snapshots share L2 tables
 * and L1 tables by refcount; a duplicated refcount block is a refcount error
 * that check reports, not an overlap).
 */
const SHAREABLE: ReadonlySet<MetadataKind> = new Set(['L2 table', 'refcount block', 'snapshot L1 table']);

interface Run {
  /** First cluster (index) of the run. */
  start: number;
  /** One past its last cluster. */
  end: number;
  kind: MetadataKind;
}

export interface Overlap {
  kind: MetadataKind;
  /** Host offset of the first overlapping metadata cluster. */
  offset: number;
}

export class MetadataRanges {
  readonly clusterSize: number;
  private runs: Run[] = [];
  /**
   * Turns an overlap into the error to throw; the driver replaces it with one
   * that also marks the image corrupt.
   */
  onCorrupt: (message: string) => VdiskError = (message) => new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: ${message}`);

  constructor(clusterSize: number) {
    this.clusterSize = clusterSize;
  }

  /** Number of runs held (for tests: it must not grow with references). */
  get size(): number {
    return this.runs.length;
  }

  /** Index of the first run ending after cluster `c`. */
  private firstEndingAfter(c: number): number {
    let lo = 0;
    let hi = this.runs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.runs[mid]!.end <= c) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private clusters(offset: number, bytes: number): [number, number] {
    return [Math.floor(offset / this.clusterSize), Math.ceil((offset + bytes) / this.clusterSize)];
  }

  /** The first metadata overlapping [offset, offset+bytes), cluster granular; null if none. */
  find(offset: number, bytes: number, ignore?: MetadataKind): Overlap | null {
    const [s, e] = this.clusters(offset, bytes);
    for (let i = this.firstEndingAfter(s); i < this.runs.length && this.runs[i]!.start < e; i++) {
      const r = this.runs[i]!;
      if (r.kind !== ignore) return { kind: r.kind, offset: Math.max(r.start, s) * this.clusterSize };
    }
    return null;
  }

  /**
   * Record a table. Returns what it overlaps (and then records only the free
   * part), or null. Naming a shareable table again is not an overlap.
   */
  add(offset: number, bytes: number, kind: MetadataKind): Overlap | null {
    const [s, e] = this.clusters(offset, bytes);
    // Fast path: a shared table named again (L1 entries naming one L2 table).
    const hit = this.runs[this.firstEndingAfter(s)];
    if (hit && hit.start <= s && hit.end >= e && hit.kind === kind && SHAREABLE.has(kind)) return null;
    let conflict: Overlap | null = null;
    const gaps: Array<[number, number]> = [];
    let c = s;
    for (let i = this.firstEndingAfter(s); i < this.runs.length && this.runs[i]!.start < e; i++) {
      const r = this.runs[i]!;
      if (r.start > c) gaps.push([c, r.start]);
      if (!conflict && !(r.kind === kind && SHAREABLE.has(kind))) conflict = { kind: r.kind, offset: Math.max(r.start, s) * this.clusterSize };
      c = Math.max(c, r.end);
    }
    if (c < e) gaps.push([c, e]);
    for (const [a, b] of gaps) this.insertAt(this.firstEndingAfter(a), a, b, kind);
    return conflict;
  }

  /** Insert [start, end) at position i, merged with neighbours of the same kind. */
  private insertAt(i: number, start: number, end: number, kind: MetadataKind): void {
    const prev = this.runs[i - 1];
    const next = this.runs[i];
    if (prev && prev.end === start && prev.kind === kind) {
      prev.end = end;
      if (next && next.start === end && next.kind === kind) {
        prev.end = next.end;
        this.runs.splice(i, 1);
      }
    } else if (next && next.start === end && next.kind === kind) {
      next.start = start;
    } else {
      this.runs.splice(i, 0, { start, end, kind });
    }
  }

  /** The clusters of [offset, offset+bytes) hold no metadata any more (freed). */
  remove(offset: number, bytes: number): void {
    const [s, e] = this.clusters(offset, bytes);
    let i = this.firstEndingAfter(s);
    while (i < this.runs.length && this.runs[i]!.start < e) {
      const r = this.runs[i]!;
      if (r.start < s && r.end > e) {
        this.runs.splice(i + 1, 0, { start: e, end: r.end, kind: r.kind });
        r.end = s;
        return;
      }
      if (r.start < s) {
        r.end = s;
        i++;
      } else if (r.end > e) {
        r.start = e;
        return;
      } else {
        this.runs.splice(i, 1);
      }
    }
  }

  /**
   * Refuse to put `what` (data or a new table) on metadata: throws the
   * corruption error. Called at every allocation and before in-place writes.
   */
  assertFree(offset: number, bytes: number, what: string, ignore?: MetadataKind): void {
    const o = this.find(offset, bytes, ignore);
    if (o) throw this.onCorrupt(`${what} at ${offset} overlaps the ${o.kind} at ${o.offset}`);
  }

  /** Record a table that must not overlap other metadata; throws the corruption error if it does. */
  addTable(offset: number, bytes: number, kind: MetadataKind): void {
    const o = this.add(offset, bytes, kind);
    if (o) throw this.onCorrupt(`the ${kind} at ${offset} overlaps the ${o.kind} at ${o.offset}`);
  }
}

export interface ImageTables {
  clusterSize: number;
  l1TableOffset: number;
  l1Size: number;
  l1: Buffer;
  /** Refcount table and blocks, as Refcounts.metadataClusters() lists them. */
  refcountClusters: Array<{ offset: number; clusters: number; what: string }>;
  nbSnapshots: number;
  snapshotsOffset: number;
}

/**
 * The metadata of an image as it is opened, and every overlap between its
 * tables (as messages). Reads the snapshot table (bounded by its real size)
 * to place the snapshots' L1 tables; L2 tables come from the L1 entries, so
 * no table is read for them.
 */
export async function loadMetadataRanges(file: BlockNode, t: ImageTables): Promise<{ ranges: MetadataRanges; overlaps: string[] }> {
  const ranges = new MetadataRanges(t.clusterSize);
  const overlaps: string[] = [];
  const overlap = (what: string, offset: number, o: Overlap) => overlaps.push(`the ${what} at ${offset} overlaps the ${o.kind} at ${o.offset}`);
  const add = (offset: number, bytes: number, kind: MetadataKind, what: string = kind) => {
    const o = ranges.add(offset, bytes, kind);
    if (o) overlap(what, offset, o);
  };
  add(0, t.clusterSize, 'header');
  add(t.l1TableOffset, t.l1Size * 8, 'L1 table');
  for (const m of t.refcountClusters) add(m.offset, m.clusters * t.clusterSize, m.what === 'refcount table' ? 'refcount table' : 'refcount block', m.what);
  if (t.nbSnapshots) {
    let tableBytes = 0;
    for await (const snap of snapshotEntries(file, t.snapshotsOffset, t.nbSnapshots)) {
      if (snap.l1Size) add(snap.offset, snap.l1Size * 8, 'snapshot L1 table');
      tableBytes += snap.bytes;
    }
    add(t.snapshotsOffset, tableBytes, 'snapshot table');
  }
  for (let i = 0; i < t.l1Size; i++) {
    const { offset } = readL1Entry(t.l1, i);
    if (!offset) continue;
    // Up to 4M entries: the message is made only for an overlap.
    const o = ranges.add(offset, t.clusterSize, 'L2 table');
    if (o) overlap(`L2 table of L1 entry ${i}`, offset, o);
  }
  return { ranges, overlaps };
}

/** Reads a file in 64 KiB windows: the snapshot table is parsed entry by entry. */
function windowReader(file: BlockNode): (pos: number, n: number) => Promise<Buffer | null> {
  let winPos = -1;
  let win = Buffer.alloc(0);
  return async (pos, n) => {
    if (pos + n > file.size()) return null;
    if (pos < winPos || pos + n > winPos + win.length) {
      winPos = pos;
      win = Buffer.alloc(Math.min(Math.max(n, 64 * 1024), file.size() - pos));
      await io.preadv(file, pos, win.length, [win]);
    }
    return win.subarray(pos - winPos, pos - winPos + n);
  };
}

interface SnapshotEntry {
  offset: number;
  l1Size: number;
  /** Bytes of this entry in the snapshot table, padded. */
  bytes: number;
}

async function* snapshotEntries(file: BlockNode, tableOffset: number, count: number): AsyncGenerator<SnapshotEntry> {
  const read = windowReader(file);
  let pos = tableOffset;
  for (let s = 0; s < count; s++) {
    const h = await read(pos, 40);
    if (!h) return; // runs past the end of the file: check reports it
    const l1Size = h.readUInt32BE(8);
    const entry = {
      offset: Number(h.readBigUInt64BE(0) & 0x00fffffffffffe00n),
      // An absurd size is check's to report; here it would only cost memory.
      l1Size: l1Size * 8 <= MAX_L1_BYTES ? l1Size : 0,
      bytes: Math.ceil((40 + h.readUInt32BE(36) + h.readUInt16BE(12) + h.readUInt16BE(14)) / 8) * 8,
    };
    yield entry;
    pos += entry.bytes;
  }
}
