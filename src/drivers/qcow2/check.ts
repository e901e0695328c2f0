/**
 * qcow2 consistency check and repair, in the spirit of `qemu-img check`:
 * count the references every metadata structure makes to each host cluster,
 * compare with the stored refcounts (leaks: stored > referenced; errors:
 * stored < referenced), verify the COPIED flags, and optionally fix them.
 */
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { EXT_BITMAPS, EXT_CRYPTO } from './header.js';
import type { Qcow2Driver } from './index.js';
import { readL1Entry, readL2Entry, writeL1Entry } from './l2-entry.js';

export type RepairMode = 'none' | 'leaks' | 'all';

export interface CheckResult {
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  messages: string[];
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  /** Data clusters that overlap metadata: nothing is repaired while there are any. */
  overlaps: number;
}

/** A bounded, growable count per host cluster. */
class Counts {
  private counts = new Uint32Array(1024);
  max = 0;

  add(cluster: number): void {
    if (cluster >= this.counts.length) {
      let n = this.counts.length;
      while (n <= cluster) n *= 2;
      const grown = new Uint32Array(n);
      grown.set(this.counts);
      this.counts = grown;
    }
    this.counts[cluster]!++;
    this.max = Math.max(this.max, cluster + 1);
  }

  get(cluster: number): number {
    return cluster < this.counts.length ? this.counts[cluster]! : 0;
  }
}

interface Walk {
  counts: Counts;
  messages: string[];
  corruptions: number;
  overlaps: number;
  /** Guest clusters of the active L1 whose COPIED flags need a look: [l2 table offset, index]. */
  active: Array<{ table: number; index: number; host: number; copied: boolean }>;
  activeL2: Array<{ l1Index: number; offset: number; copied: boolean }>;
}

async function walk(drv: Qcow2Driver): Promise<Walk> {
  const cs = drv.clusterSize;
  const fileSize = Math.max(drv.file.size(), drv.refcounts.fileEnd);
  const w: Walk = { counts: new Counts(), messages: [], corruptions: 0, overlaps: 0, active: [], activeL2: [] };
  const ref = (offset: number, bytes: number, what: string): boolean => {
    if (offset + bytes > fileSize || offset < 0) {
      w.corruptions++;
      w.messages.push(`ERROR ${what} at offset ${offset} lies outside the file`);
      return false;
    }
    for (let c = Math.floor(offset / cs); c < Math.ceil((offset + bytes) / cs); c++) w.counts.add(c);
    return true;
  };
  /** Data on metadata: counted apart, because no refcount repair can fix it. */
  const overlapping = (offset: number, bytes: number, what: string): void => {
    const o = drv.metadataRanges.find(offset, bytes);
    if (!o) return;
    w.corruptions++;
    w.overlaps++;
    w.messages.push(`ERROR ${what} at ${offset} overlaps the ${o.kind} at ${o.offset}`);
  };
  const h = drv.header;
  ref(0, cs, 'header');
  const walkL1 = async (l1: Buffer, l1Size: number, active: boolean) => {
    for (let i = 0; i < l1Size; i++) {
      const { offset, copied } = readL1Entry(l1, i);
      if (!offset) continue;
      if (offset % cs) {
        w.corruptions++;
        w.messages.push(`ERROR L1 entry ${i} has unaligned offset ${offset}`);
        continue;
      }
      if (!ref(offset, cs, `L2 table of L1 entry ${i}`)) continue;
      if (active) w.activeL2.push({ l1Index: i, offset, copied });
      const table = active ? await drv.l2Cache.get(offset) : await readCluster(drv, offset);
      for (let j = 0; j < drv.l2Entries; j++) {
        const e = readL2Entry(table, j, drv.extendedL2, drv.clusterBits);
        if (e.compressed) {
          const start = e.compressedOffset - (e.compressedOffset % 512);
          overlapping(start, e.compressedOffset + e.compressedBytes - start, `compressed cluster of guest cluster ${i * drv.l2Entries + j}`);
          ref(start, e.compressedOffset + e.compressedBytes - start, 'compressed cluster');
        } else if (e.host) {
          if (e.host % cs) {
            w.corruptions++;
            w.messages.push(`ERROR L2 entry ${j} of table ${offset} has unaligned offset ${e.host}`);
            continue;
          }
          overlapping(e.host, cs, `data cluster of guest cluster ${i * drv.l2Entries + j}`);
          if (ref(e.host, cs, 'data cluster') && active) w.active.push({ table: offset, index: j, host: e.host, copied: e.copied });
        }
      }
    }
  };
  ref(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  await walkL1(drv.l1Table, h.l1Size, true);

  // Internal snapshots: their L1 tables, and everything those reach.
  if (h.nbSnapshots) {
    const table = Buffer.alloc(Math.min(64 * 1024 * 1024, Math.max(0, drv.file.size() - h.snapshotsOffset)));
    await io.preadv(drv.file, h.snapshotsOffset, table.length, [table]);
    let pos = 0;
    for (let s = 0; s < h.nbSnapshots; s++) {
      if (pos + 40 > table.length) throw new VdiskError('ERR_IMAGE_CORRUPT', 'qcow2: snapshot table runs past the end of the file');
      const l1Offset = Number(table.readBigUInt64BE(pos));
      const l1Size = table.readUInt32BE(pos + 8);
      const idLen = table.readUInt16BE(pos + 12);
      const nameLen = table.readUInt16BE(pos + 14);
      const extra = table.readUInt32BE(pos + 36);
      if (l1Size * 8 > 32 * 1024 * 1024) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: snapshot ${s} has an absurd L1 size`);
      if (ref(l1Offset, l1Size * 8, `L1 table of snapshot ${s}`)) {
        const l1 = Buffer.alloc(l1Size * 8);
        await io.preadv(drv.file, l1Offset, l1.length, [l1]);
        await walkL1(l1, l1Size, false);
      }
      pos += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
    }
    ref(h.snapshotsOffset, pos, 'snapshot table');
  }

  for (const m of drv.refcounts.metadataClusters()) ref(m.offset, m.clusters * cs, m.what);

  for (const ext of h.extensions) {
    if (ext.type === EXT_CRYPTO && ext.data.length >= 16) ref(Number(ext.data.readBigUInt64BE(0)), Number(ext.data.readBigUInt64BE(8)), 'encryption header');
    if (ext.type === EXT_BITMAPS) for (const r of await bitmapRanges(drv, ext.data)) ref(r.offset, r.bytes, r.what);
  }
  return w;
}

/** Every range the persistent bitmaps of the bitmaps extension occupy (directory, tables, data). */
export async function bitmapRanges(drv: Qcow2Driver, ext: Buffer): Promise<Array<{ offset: number; bytes: number; what: string }>> {
  const out: Array<{ offset: number; bytes: number; what: string }> = [];
  if (ext.length < 24) return out;
  const nb = ext.readUInt32BE(0);
  const dirSize = Number(ext.readBigUInt64BE(8));
  const dirOffset = Number(ext.readBigUInt64BE(16));
  const fileSize = drv.file.size();
  if (dirSize > 64 * 1024 * 1024 || dirOffset + dirSize > fileSize) return [{ offset: dirOffset, bytes: dirSize, what: 'bitmap directory' }];
  out.push({ offset: dirOffset, bytes: dirSize, what: 'bitmap directory' });
  const dir = Buffer.alloc(dirSize);
  await io.preadv(drv.file, dirOffset, dirSize, [dir]);
  let pos = 0;
  for (let b = 0; b < nb && pos + 24 <= dir.length; b++) {
    const tableOffset = Number(dir.readBigUInt64BE(pos));
    const tableSize = dir.readUInt32BE(pos + 8);
    const nameSize = dir.readUInt16BE(pos + 18);
    const extraSize = dir.readUInt32BE(pos + 20);
    out.push({ offset: tableOffset, bytes: tableSize * 8, what: 'bitmap table' });
    if (tableSize * 8 <= 64 * 1024 * 1024 && tableOffset + tableSize * 8 <= fileSize) {
      const t = Buffer.alloc(tableSize * 8);
      await io.preadv(drv.file, tableOffset, t.length, [t]);
      for (let i = 0; i < tableSize; i++) {
        const off = readL1Entry(t, i).offset;
        if (off) out.push({ offset: off, bytes: drv.clusterSize, what: 'bitmap data' });
      }
    }
    pos += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
  return out;
}

async function readCluster(drv: Qcow2Driver, offset: number): Promise<Buffer> {
  const b = Buffer.alloc(drv.clusterSize);
  await io.preadv(drv.file, offset, b.length, [b]);
  return b;
}

/** Check the image; with `repair`, fix leaks ('leaks') or everything that can be fixed ('all'). */
export async function checkImage(drv: Qcow2Driver, repair: RepairMode = 'none'): Promise<CheckResult> {
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [], imageEndOffset: 0, totalClusters: 0, allocatedClusters: 0, overlaps: 0 };
  // Tables found overlapping at open: a repair would write through them.
  const tableOverlap = drv.corrupt;
  const notes = tableOverlap ? [`ERROR ${tableOverlap}`] : [];
  if (repair !== 'none' && !drv.allowRepair()) {
    notes.push(`Not repairing anything: ${tableOverlap ? 'metadata tables overlap' : 'the image is opened read-only'}`);
    repair = 'none';
  }
  for (let pass = 0; pass < 4; pass++) {
    const w = await walk(drv);
    w.messages.unshift(...notes);
    if (tableOverlap) w.corruptions++;
    result.overlaps = w.overlaps;
    // Raising refcounts for data that sits on metadata would leave a refcount block
    // with refcount 2 (qemu-img: broken); rebuilding the structure elsewhere is qemu-img's job.
    if (w.overlaps && repair !== 'none') {
      w.messages.push(`Not repairing anything: ${w.overlaps} data clusters overlap metadata (qemu-img check -r all rebuilds the refcount structure)`);
      repair = 'none';
    }
    const rc = drv.refcounts;
    const end = Math.max(w.counts.max, Math.ceil(Math.max(drv.file.size(), rc.fileEnd) / drv.clusterSize));
    let leaks = 0;
    let errors = 0;
    let fixes = 0;
    const fixesBefore = result.leaksFixed + result.corruptionsFixed;
    const messages = [...w.messages];
    for (let c = 0; c < end; c++) {
      const expected = w.counts.get(c);
      const actual = await rc.get(c);
      if (actual === expected) continue;
      if (actual > expected) {
        leaks++;
        if (repair !== 'none') {
          await rc.set(c, expected);
          result.leaksFixed++;
          fixes++;
        } else messages.push(`Leaked cluster ${c} refcount=${actual} reference=${expected}`);
      } else {
        errors++;
        if (expected > rc.maxRefcount) {
          messages.push(`ERROR cluster ${c} is referenced ${expected} times, more than ${rc.bits}-bit refcounts can count`);
        } else if (repair === 'all') {
          await rc.set(c, expected);
          result.corruptionsFixed++;
          fixes++;
        } else messages.push(`ERROR cluster ${c} refcount=${actual} reference=${expected}`);
      }
    }
    // COPIED flags of the active tables must say "refcount is exactly one".
    for (const l2 of w.activeL2) {
      const one = (await rc.get(l2.offset / drv.clusterSize)) === 1;
      if (one === l2.copied) continue;
      errors++;
      if (repair === 'all') {
        writeL1Entry(drv.l1Table, l2.l1Index, l2.offset, one);
        drv.markL1Dirty();
        result.corruptionsFixed++;
        fixes++;
      } else messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${l2.l1Index} refcount mismatch`);
    }
    for (const d of w.active) {
      const one = (await rc.get(d.host / drv.clusterSize)) === 1;
      if (one === d.copied) continue;
      errors++;
      if (repair === 'all') {
        const table = await drv.l2Cache.get(d.table);
        const pos = d.index * (drv.extendedL2 ? 16 : 8);
        const hi = table.readUInt32BE(pos);
        table.writeUInt32BE((one ? hi | 0x80000000 : hi & 0x7fffffff) >>> 0, pos);
        drv.l2Cache.markDirty(d.table, table);
        result.corruptionsFixed++;
        fixes++;
      } else messages.push(`ERROR OFLAG_COPIED data cluster: host offset ${d.host}`);
    }
    if (pass === 0) {
      result.leaks = leaks;
      result.corruptions = errors + w.corruptions;
    }
    result.messages = messages;
    let allocated = 0;
    for (let c = 0; c < end; c++) if (w.counts.get(c)) allocated++;
    result.allocatedClusters = allocated;
    result.totalClusters = Math.ceil(drv.size() / drv.clusterSize);
    result.imageEndOffset = end * drv.clusterSize;
    if (!fixes) break;
    await drv.flush();
    // Repairs can allocate refcount blocks: check again until nothing changes.
    if (result.leaksFixed + result.corruptionsFixed === fixesBefore) break;
  }
  if (repair === 'all' && result.corruptions === result.corruptionsFixed) await drv.markConsistent();
  return result;
}

/** Rebuild refcounts (used on open when the dirty bit is set). */
export async function repairImage(drv: Qcow2Driver, mode: RepairMode): Promise<CheckResult> {
  return checkImage(drv, mode);
}
