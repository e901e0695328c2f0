/**
 * qcow2 consistency check and repair, in the spirit of `qemu-img check`:
 * count the references every metadata structure makes to each host cluster,
 * compare with the stored refcounts (leaks: stored > referenced; errors:
 * stored < referenced), verify the COPIED flags, and optionally fix them.
 */
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { EXT_BITMAPS, EXT_CRYPTO, MAX_L1_BYTES } from './header.js';
import { readL1Entry, readL2Entry, setL2Copied, writeL1Entry } from './l2-entry.js';
import { flush } from './flush.js';
import type { Qcow2State } from './state.js';
import type { CheckResult, RepairMode } from '../../block/driver.js';

export type { CheckResult, RepairMode };

/** Clusters per page of Counts. */
const PAGE = 4096;
/** A page turns from sparse to dense once this many of its clusters are referenced. */
const DENSE_AT = 256;
/** Counts saturate here instead of wrapping. */
const MAX_COUNT = 0xffffffff;

/**
 * References per host cluster. Memory grows with the distinct clusters the
 * metadata references (a page is a small map until it fills up, then a dense
 * array), never with the file's apparent size (a far reference costs one
 * small page) nor with how often a cluster is referenced (a count is a number).
 */
export class Counts {
  private readonly pages = new Map<number, Map<number, number> | Uint32Array>();
  /** One past the highest referenced cluster. */
  max = 0;
  /** Distinct referenced clusters. */
  size = 0;

  add(cluster: number, weight = 1): void {
    const key = Math.floor(cluster / PAGE);
    const i = cluster % PAGE;
    let page = this.pages.get(key);
    if (!page) this.pages.set(key, (page = new Map()));
    if (page instanceof Map) {
      const old = page.get(i) ?? 0;
      if (!old) this.size++;
      page.set(i, Math.min(MAX_COUNT, old + weight));
      if (page.size > DENSE_AT) {
        const dense = new Uint32Array(PAGE);
        for (const [k, v] of page) dense[k] = v;
        this.pages.set(key, dense);
      }
    } else {
      if (!page[i]) this.size++;
      page[i] = Math.min(MAX_COUNT, page[i]! + weight);
    }
    this.max = Math.max(this.max, cluster + 1);
  }

  get(cluster: number): number {
    const page = this.pages.get(Math.floor(cluster / PAGE));
    if (!page) return 0;
    return (page instanceof Map ? page.get(cluster % PAGE) : page[cluster % PAGE]) ?? 0;
  }

  /** Referenced clusters and their counts, in cluster order. */
  *entries(): Generator<[number, number]> {
    for (const key of [...this.pages.keys()].sort((a, b) => a - b)) {
      const page = this.pages.get(key)!;
      const base = key * PAGE;
      if (page instanceof Map) {
        for (const i of [...page.keys()].sort((a, b) => a - b)) yield [base + i, page.get(i)!];
      } else {
        for (let i = 0; i < PAGE; i++) if (page[i]) yield [base + i, page[i]!];
      }
    }
  }
}

/**
 * The most check reads whole of a snapshot table, bitmap directory or bitmap
 * table: a hostile header cannot make it allocate more.
 */
const MAX_TABLE_READ_BYTES = 64 * 1024 * 1024;

/** At most this many messages are kept; a hostile image could otherwise make millions. */
const MAX_MESSAGES = 10000;

class Messages {
  readonly list: string[] = [];
  private omitted = 0;

  push(m: string): void {
    if (this.list.length < MAX_MESSAGES) this.list.push(m);
    else this.omitted++;
  }

  /** Notes that go first, whatever the cap. */
  unshift(...m: string[]): void {
    this.list.unshift(...m);
  }

  done(): string[] {
    return this.omitted ? [...this.list, `... and ${this.omitted} more messages`] : this.list;
  }
}

interface Walk {
  counts: Counts;
  messages: Messages;
  corruptions: number;
  overlaps: number;
  /** Distinct L2 tables the active L1 names (cluster indexes): their COPIED flags are checked. */
  activeTables: Counts;
}

async function walk(img: Qcow2State): Promise<Walk> {
  const cs = img.clusterSize;
  const fileSize = Math.max(img.file.size(), img.refcounts.fileEnd);
  const w: Walk = { counts: new Counts(), messages: new Messages(), corruptions: 0, overlaps: 0, activeTables: new Counts() };
  const inFile = (offset: number, bytes: number, what: string): boolean => {
    if (offset + bytes > fileSize || offset < 0) {
      w.corruptions++;
      w.messages.push(`ERROR ${what} at offset ${offset} lies outside the file`);
      return false;
    }
    return true;
  };
  const ref = (offset: number, bytes: number, what: string, weight = 1): boolean => {
    if (!inFile(offset, bytes, what)) return false;
    for (let c = Math.floor(offset / cs); c < Math.ceil((offset + bytes) / cs); c++) w.counts.add(c, weight);
    return true;
  };
  /** Data on metadata: counted apart, because no refcount repair can fix it. */
  const overlapping = (offset: number, bytes: number, what: string): void => {
    const o = img.metadataRanges.find(offset, bytes);
    if (!o) return;
    w.corruptions++;
    w.overlaps++;
    w.messages.push(`ERROR ${what} at ${offset} overlaps the ${o.kind} at ${o.offset}`);
  };
  const h = img.header;
  ref(0, cs, 'header');
  // L2 tables are counted per L1 entry, but each distinct table's contents are
  // read once and counted with the number of L1 entries naming it: cost follows
  // the metadata, not how often a hostile L1 repeats one table.
  const tables = new Counts();
  const firstL1 = new Counts();
  const addL1 = (l1: Buffer, l1Size: number, weight: number, active: boolean) => {
    for (let i = 0; i < l1Size; i++) {
      const { offset } = readL1Entry(l1, i);
      if (!offset) continue;
      if (offset % cs) {
        w.corruptions += weight;
        w.messages.push(`ERROR L1 entry ${i} has unaligned offset ${offset}`);
        continue;
      }
      if (!inFile(offset, cs, `L2 table of L1 entry ${i}`)) continue;
      tables.add(offset / cs, weight);
      // The first L1 entry naming a table gives its entries their guest cluster numbers in messages.
      if (!firstL1.get(offset / cs)) firstL1.add(offset / cs, i + 1);
      if (active) w.activeTables.add(offset / cs);
    }
  };
  ref(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  addL1(img.l1, h.l1Size, 1, true);

  // Internal snapshots: their L1 tables (each distinct one read once), and everything those reach.
  if (h.nbSnapshots) {
    const table = Buffer.alloc(Math.min(MAX_TABLE_READ_BYTES, Math.max(0, img.file.size() - h.snapshotsOffset)));
    await io.preadv(img.file, h.snapshotsOffset, table.length, [table]);
    const l1s = new Map<string, { offset: number; size: number; weight: number }>();
    let pos = 0;
    for (let s = 0; s < h.nbSnapshots; s++) {
      if (pos + 40 > table.length) throw new VdiskError('ERR_IMAGE_CORRUPT', 'qcow2: snapshot table runs past the end of the file');
      const l1Offset = Number(table.readBigUInt64BE(pos));
      const l1Size = table.readUInt32BE(pos + 8);
      const idLen = table.readUInt16BE(pos + 12);
      const nameLen = table.readUInt16BE(pos + 14);
      const extra = table.readUInt32BE(pos + 36);
      if (l1Size * 8 > MAX_L1_BYTES) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: snapshot ${s} has an absurd L1 size`);
      if (ref(l1Offset, l1Size * 8, `L1 table of snapshot ${s}`)) {
        const key = `${l1Offset}:${l1Size}`;
        const seen = l1s.get(key);
        if (seen) seen.weight++;
        else l1s.set(key, { offset: l1Offset, size: l1Size, weight: 1 });
      }
      pos += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
    }
    ref(h.snapshotsOffset, pos, 'snapshot table');
    for (const l1 of l1s.values()) {
      const buf = Buffer.alloc(l1.size * 8);
      await io.preadv(img.file, l1.offset, buf.length, [buf]);
      addL1(buf, l1.size, l1.weight, false);
    }
  }

  for (const [cluster, weight] of tables.entries()) {
    const offset = cluster * cs;
    const firstGuest = (firstL1.get(cluster) - 1) * img.l2Entries;
    ref(offset, cs, 'L2 table', weight);
    // A table changed in memory (repair) is read from the cache, others from the file.
    const table = img.l2Cache.peek(offset) ?? (await readCluster(img, offset));
    for (let j = 0; j < img.l2Entries; j++) {
      const e = readL2Entry(table, j, img.extendedL2, img.clusterBits);
      if (e.compressed) {
        const start = e.compressedOffset - (e.compressedOffset % 512);
        overlapping(start, e.compressedOffset + e.compressedBytes - start, `compressed cluster of guest cluster ${firstGuest + j}`);
        ref(start, e.compressedOffset + e.compressedBytes - start, 'compressed cluster', weight);
      } else if (e.host) {
        if (e.host % cs) {
          w.corruptions += weight;
          w.messages.push(`ERROR L2 entry ${j} of table ${offset} has unaligned offset ${e.host}`);
          continue;
        }
        overlapping(e.host, cs, `data cluster of guest cluster ${firstGuest + j}`);
        ref(e.host, cs, 'data cluster', weight);
      }
    }
  }

  for (const m of img.refcounts.metadataClusters()) ref(m.offset, m.clusters * cs, m.what);

  for (const ext of h.extensions) {
    if (ext.type === EXT_CRYPTO && ext.data.length >= 16) ref(Number(ext.data.readBigUInt64BE(0)), Number(ext.data.readBigUInt64BE(8)), 'encryption header');
    if (ext.type === EXT_BITMAPS) for (const r of await bitmapRanges(img, ext.data)) ref(r.offset, r.bytes, r.what);
  }
  return w;
}

/** Every range the persistent bitmaps of the bitmaps extension occupy (directory, tables, data). */
export async function bitmapRanges(img: Qcow2State, ext: Buffer): Promise<Array<{ offset: number; bytes: number; what: string }>> {
  const out: Array<{ offset: number; bytes: number; what: string }> = [];
  if (ext.length < 24) return out;
  const nb = ext.readUInt32BE(0);
  const dirSize = Number(ext.readBigUInt64BE(8));
  const dirOffset = Number(ext.readBigUInt64BE(16));
  const fileSize = img.file.size();
  if (dirSize > MAX_TABLE_READ_BYTES || dirOffset + dirSize > fileSize) return [{ offset: dirOffset, bytes: dirSize, what: 'bitmap directory' }];
  out.push({ offset: dirOffset, bytes: dirSize, what: 'bitmap directory' });
  const dir = Buffer.alloc(dirSize);
  await io.preadv(img.file, dirOffset, dirSize, [dir]);
  let pos = 0;
  for (let b = 0; b < nb && pos + 24 <= dir.length; b++) {
    const tableOffset = Number(dir.readBigUInt64BE(pos));
    const tableSize = dir.readUInt32BE(pos + 8);
    const nameSize = dir.readUInt16BE(pos + 18);
    const extraSize = dir.readUInt32BE(pos + 20);
    out.push({ offset: tableOffset, bytes: tableSize * 8, what: 'bitmap table' });
    if (tableSize * 8 <= MAX_TABLE_READ_BYTES && tableOffset + tableSize * 8 <= fileSize) {
      const t = Buffer.alloc(tableSize * 8);
      await io.preadv(img.file, tableOffset, t.length, [t]);
      for (let i = 0; i < tableSize; i++) {
        const off = readL1Entry(t, i).offset;
        if (off) out.push({ offset: off, bytes: img.clusterSize, what: 'bitmap data' });
      }
    }
    pos += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
  return out;
}

async function readCluster(img: Qcow2State, offset: number): Promise<Buffer> {
  const b = Buffer.alloc(img.clusterSize);
  await io.preadv(img.file, offset, b.length, [b]);
  return b;
}

/** Check the image; with `repair`, fix leaks ('leaks') or everything that can be fixed ('all'). */
export async function checkImage(img: Qcow2State, repair: RepairMode = 'none'): Promise<CheckResult> {
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [], imageEndOffset: 0, totalClusters: 0, allocatedClusters: 0, overlaps: 0 };
  const cs = img.clusterSize;
  // Tables found overlapping at open: a repair would write through them.
  const tableOverlap = img.corruptReason;
  const notes = tableOverlap ? [`ERROR ${tableOverlap}`] : [];
  if (repair !== 'none' && !img.allowRepair()) {
    notes.push(`Not repairing anything: ${tableOverlap ? 'metadata tables overlap' : 'the image is opened read-only'}`);
    repair = 'none';
  }
  for (let pass = 0; pass < 4; pass++) {
    const w = await walk(img);
    w.messages.unshift(...notes);
    if (tableOverlap) w.corruptions++;
    result.overlaps = w.overlaps;
    // Raising refcounts for data that sits on metadata would leave a refcount block
    // with refcount 2 (qemu-img: broken); rebuilding the structure elsewhere is qemu-img's job.
    if (w.overlaps && repair !== 'none') {
      w.messages.push(`Not repairing anything: ${w.overlaps} data clusters overlap metadata (qemu-img check -r all rebuilds the refcount structure)`);
      repair = 'none';
    }
    const rc = img.refcounts;
    let leaks = 0;
    let errors = 0;
    let fixes = 0;
    let highest = -1;
    const fixesBefore = result.leaksFixed + result.corruptionsFixed;
    const messages = w.messages;
    /** One cluster whose refcount differs from its references; true if it was repaired. */
    const mismatch = async (c: number, expected: number, actual: number): Promise<boolean> => {
      if (actual > expected) {
        leaks++;
        if (repair !== 'none') {
          await rc.set(c, expected);
          result.leaksFixed++;
          fixes++;
          return true;
        }
        messages.push(`Leaked cluster ${c} refcount=${actual} reference=${expected}`);
        return false;
      }
      errors++;
      if (expected > rc.maxRefcount) {
        messages.push(`ERROR cluster ${c} is referenced ${expected} times, more than ${rc.bits}-bit refcounts can count`);
      } else if (repair === 'all') {
        await rc.set(c, expected);
        result.corruptionsFixed++;
        fixes++;
        return true;
      } else messages.push(`ERROR cluster ${c} refcount=${actual} reference=${expected}`);
      return false;
    };
    // Compare only where something is: the clusters the refcount blocks describe
    // (each distinct block scanned once, without I/O per entry) and the
    // referenced ones. A file's apparent size adds nothing: past them every
    // refcount and every reference is zero.
    const refs = w.counts.entries();
    let next = refs.next();
    const referencedBefore = async (end: number) => {
      for (; !next.done && next.value[0] < end; next = refs.next()) {
        const [c, expected] = next.value;
        highest = Math.max(highest, c);
        const actual = await rc.get(c);
        if (actual !== expected) await mismatch(c, expected, actual);
      }
    };
    const perBlock = rc.entriesPerBlock;
    const scannedBlocks = new Set<number>();
    const tableEntries = rc.tableEntries;
    for (let t = 0; t < tableEntries; t++) {
      const off = rc.blockAt(t);
      // A block named twice is an error counted on the block itself; its clusters are scanned once.
      if (!off || scannedBlocks.has(off)) continue;
      scannedBlocks.add(off);
      const from = t * perBlock;
      await referencedBefore(from);
      let read = await rc.blockReader(t);
      for (let c = from; c < from + perBlock; c++) {
        let expected = 0;
        if (!next.done && next.value[0] === c) {
          expected = next.value[1];
          next = refs.next();
        }
        const actual = read(c - from);
        if (actual || expected) highest = c;
        if (actual === expected) continue;
        if (await mismatch(c, expected, actual)) read = await rc.blockReader(t);
      }
    }
    await referencedBefore(Infinity);

    // COPIED flags of the active tables must say "refcount is exactly one".
    // Refcounts are read block by block without I/O per entry (no repair here changes them).
    let readerBlock = -1;
    let reader: ((i: number) => number) | null = null;
    const refcountOf = async (c: number): Promise<number> => {
      const t = Math.floor(c / perBlock);
      if (t !== readerBlock) {
        readerBlock = t;
        reader = rc.blockAt(t) ? await rc.blockReader(t) : null;
      }
      return reader ? reader(c % perBlock) : 0;
    };
    const l1 = img.l1;
    const fileSize = Math.max(img.file.size(), rc.fileEnd);
    for (let i = 0; i < img.header.l1Size; i++) {
      const { offset, copied } = readL1Entry(l1, i);
      if (!offset || offset % cs || offset + cs > fileSize) continue;
      const one = (await refcountOf(offset / cs)) === 1;
      if (one === copied) continue;
      errors++;
      if (repair === 'all') {
        writeL1Entry(l1, i, offset, one);
        img.l1Dirty = true;
        result.corruptionsFixed++;
        fixes++;
      } else messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} refcount mismatch`);
    }
    for (const [tableCluster] of w.activeTables.entries()) {
      const tableOffset = tableCluster * cs;
      const table = await img.l2Cache.get(tableOffset);
      let changed = false;
      for (let j = 0; j < img.l2Entries; j++) {
        const e = readL2Entry(table, j, img.extendedL2, img.clusterBits);
        if (e.compressed || !e.host || e.host % cs || e.host + cs > fileSize) continue;
        const one = (await refcountOf(e.host / cs)) === 1;
        if (one === e.copied) continue;
        errors++;
        if (repair === 'all') {
          setL2Copied(table, j, img.extendedL2, one);
          changed = true;
          result.corruptionsFixed++;
          fixes++;
        } else messages.push(`ERROR OFLAG_COPIED data cluster: host offset ${e.host}`);
      }
      if (changed) img.l2Cache.markDirty(tableOffset, table);
    }
    if (pass === 0) {
      result.leaks = leaks;
      result.corruptions = errors + w.corruptions;
    }
    result.messages = messages.done();
    result.allocatedClusters = w.counts.size;
    result.totalClusters = Math.ceil(img.size() / cs);
    result.imageEndOffset = (highest + 1) * cs;
    if (!fixes) break;
    await flush(img);
    // Repairs can allocate refcount blocks: check again until nothing changes.
    if (result.leaksFixed + result.corruptionsFixed === fixesBefore) break;
  }
  if (repair === 'all' && result.corruptions === result.corruptionsFixed) await img.markConsistent();
  return result;
}
