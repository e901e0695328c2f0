/**
 * qcow2 host cluster management: the two-level refcount structure, cluster
 * allocation, and frees that are held back until the L2/L1 updates that stop
 * using a cluster are on disk.
 *
 * Crash safety (the order QEMU keeps with its cache dependencies):
 *  - increments may reach the disk at any time before the L2 entries that use
 *    the clusters (worst case after a crash: a leak, which `check -r leaks` fixes);
 *  - decrements are not even applied in memory until the driver has written and
 *    flushed the L2/L1 changes (applyFrees), so a freed cluster is never reused
 *    while an on-disk table still points at it;
 *  - a new refcount block is written, and flushed, before the refcount table
 *    entry that points at it; a grown refcount table before the header.
 */
import type { BlockNode } from '../../block/node.js';
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import type { TableCache } from './table-cache.js';
import type { MetadataRanges } from './metadata-ranges.js';
import { MAX_REFTABLE_BYTES } from './header.js';
import { readRefcount, writeRefcount } from './refcount-entry.js';

const trace = tracer('qcow2');

/**
 * A refcount table entry's offset is bits 9-63 (unlike L1/L2 entries, whose
 * bits 56-63 are flags): a high bit set is an offset past any file, which the
 * load refuses, not a flag to mask away (masking served an L2 table as a
 * refcount block where qemu-img calls the entry outside the image).
 */
export function readEntryOffset(buf: Buffer, pos: number): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4) & ~0x1ff;
  return hi * 2 ** 32 + (lo >>> 0);
}

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  private readonly file: BlockNode;
  private readonly cache: TableCache;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly bits: number;
  readonly entriesPerBlock: number;
  readonly maxRefcount: number;
  tableOffset: number;
  tableClusters: number;
  private table: Buffer;
  /**
   * End of the host file as far as allocations know (bytes, cluster aligned).
   * Only grows, except by truncation: clusters at or past it were never handed
   * out and read as zero.
   */
  fileEnd: number;
  private freeHint = 0;
  private pendingFrees: number[] = [];
  /** Where metadata lives: no allocation may land there (a zero refcount on a table is a corruption). */
  ranges: MetadataRanges | null = null;
  /** Rewrites the image header after the refcount table moved. */
  private readonly onTableMoved: (offset: number, clusters: number) => Promise<void>;

  constructor(file: BlockNode, cache: TableCache, layout: RefcountLayout, table: Buffer, fileSize: number, onTableMoved: (offset: number, clusters: number) => Promise<void>) {
    this.file = file;
    this.cache = cache;
    this.clusterBits = layout.clusterBits;
    this.clusterSize = 2 ** layout.clusterBits;
    this.bits = 2 ** layout.refcountOrder;
    this.entriesPerBlock = (this.clusterSize * 8) / this.bits;
    this.maxRefcount = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.table = table;
    this.fileEnd = Math.ceil(fileSize / this.clusterSize) * this.clusterSize;
    this.onTableMoved = onTableMoved;
  }

  static async load(file: BlockNode, cache: TableCache, layout: RefcountLayout, fileSize: number, onTableMoved: (offset: number, clusters: number) => Promise<void>): Promise<Refcounts> {
    const bytes = layout.tableClusters * 2 ** layout.clusterBits;
    const table = Buffer.alloc(bytes);
    await io.preadv(file, layout.tableOffset, bytes, [table]);
    const rc = new Refcounts(file, cache, layout, table, fileSize, onTableMoved);
    for (let t = 0; t < rc.tableEntries; t++) {
      const off = rc.blockOffset(t);
      if (off !== 0 && (off % rc.clusterSize !== 0 || off + rc.clusterSize > fileSize)) {
        throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: refcount block ${t} at ${off} is unaligned or outside the file`);
      }
    }
    return rc;
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  private blockOffset(t: number): number {
    return readEntryOffset(this.table, t * 8);
  }

  private readEntry(block: Buffer, i: number): number {
    return readRefcount(block, i, this.bits);
  }

  private writeEntry(block: Buffer, i: number, value: number): void {
    writeRefcount(block, i, this.bits, value);
  }

  /** Refcount of host cluster `cluster` (index, not offset). */
  async get(cluster: number): Promise<number> {
    const t = Math.floor(cluster / this.entriesPerBlock);
    if (t >= this.tableEntries) return 0;
    const off = this.blockOffset(t);
    if (off === 0) return 0;
    const block = await this.cache.get(off);
    return this.readEntry(block, cluster % this.entriesPerBlock);
  }

  /** Set a refcount; the block must exist (ensureBlock). Write-back through the cache. */
  private async setExisting(cluster: number, value: number): Promise<void> {
    const t = Math.floor(cluster / this.entriesPerBlock);
    const off = this.blockOffset(t);
    // ensureBlock ran first: a missing block here is a bug of ours, reported like any EIO.
    if (off === 0) throw new VdiskError('EIO', `qcow2: refcount block ${t} missing (ensureBlock was not called)`);
    const block = await this.cache.get(off);
    this.writeEntry(block, cluster % this.entriesPerBlock, value);
    this.cache.markDirty(off, block);
  }

  /** Add `delta` (may be negative only from applyFrees and repair) to a refcount. */
  async update(cluster: number, delta: number): Promise<number> {
    await this.ensureBlock(Math.floor(cluster / this.entriesPerBlock));
    const value = (await this.get(cluster)) + delta;
    if (value < 0) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: refcount of cluster ${cluster} would drop below zero`);
    if (value > this.maxRefcount) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: refcount of cluster ${cluster} would overflow ${this.bits} bits`);
    await this.setExisting(cluster, value);
    return value;
  }

  /** First run of `n` clusters whose refcounts are all zero, from the free hint on. */
  private async findFree(n: number): Promise<number> {
    let start = this.freeHint;
    let c = start;
    const endCluster = this.fileEnd / this.clusterSize;
    while (c - start < n) {
      // Past the end of the file everything is free unless a refcount says otherwise.
      if ((await this.get(c)) !== 0) start = c + 1;
      c++;
      if (c > endCluster + n + this.entriesPerBlock * 4) {
        throw new VdiskError('ERR_IMAGE_CORRUPT', 'qcow2: refcounts claim clusters far past the end of the file');
      }
    }
    return start;
  }

  /**
   * Allocate `n` contiguous host clusters with refcount 1. `fresh` is true when
   * they lie past the old end of the file and so already read as zero.
   */
  async allocate(n: number): Promise<{ offset: number; fresh: boolean }> {
    for (;;) {
      const start = await this.findFree(n);
      const t0 = Math.floor(start / this.entriesPerBlock);
      const t1 = Math.floor((start + n - 1) / this.entriesPerBlock);
      let missing = -1;
      for (let t = t0; t <= t1 && missing < 0; t++) if (t >= this.tableEntries || this.blockOffset(t) === 0) missing = t;
      if (missing >= 0) {
        await this.ensureBlock(missing);
        continue; // the new block took a cluster: look again
      }
      this.ranges?.assertFree(start * this.clusterSize, n * this.clusterSize, 'a new cluster');
      for (let c = start; c < start + n; c++) await this.setExisting(c, 1);
      const offset = start * this.clusterSize;
      const end = offset + n * this.clusterSize;
      const fresh = offset >= this.fileEnd;
      this.fileEnd = Math.max(this.fileEnd, end);
      this.freeHint = start + n;
      if (trace.enabled) trace('allocate clusters=%d offset=%d fresh=%s', n, offset, fresh);
      return { offset, fresh };
    }
  }

  /** Make sure refcount block `t` exists, creating (and if needed the table growing) it. */
  private async ensureBlock(t: number, depth = 0): Promise<void> {
    if (depth > 4) throw new VdiskError('EIO', 'qcow2: refcount block allocation does not converge');
    if (t >= this.tableEntries) await this.growTable(t + 1);
    if (this.blockOffset(t) !== 0) return;
    const b = await this.findFree(1);
    this.ranges?.assertFree(b * this.clusterSize, this.clusterSize, 'a new refcount block');
    const tb = Math.floor(b / this.entriesPerBlock);
    const block = Buffer.alloc(this.clusterSize);
    if (tb === t) {
      this.writeEntry(block, b % this.entriesPerBlock, 1); // describes itself
    } else if (tb >= this.tableEntries || this.blockOffset(tb) === 0) {
      await this.ensureBlock(tb, depth + 1);
      return this.ensureBlock(t, depth + 1);
    }
    const offset = b * this.clusterSize;
    await io.pwritev(this.file, offset, this.clusterSize, [block]);
    this.fileEnd = Math.max(this.fileEnd, offset + this.clusterSize);
    if (tb !== t) await this.setExisting(b, 1);
    // The block and every refcount it depends on are on disk before the table points at it.
    await this.cache.writeDirty();
    await io.flush(this.file);
    this.table.writeBigUInt64BE(BigInt(offset), t * 8);
    await io.pwritev(this.file, this.tableOffset + t * 8, 8, [Buffer.from(this.table.subarray(t * 8, t * 8 + 8))]);
    this.cache.install(offset, block);
    this.ranges?.addTable(offset, this.clusterSize, 'refcount block');
    await this.cache.writeDirty();
    trace('new refcount block table=%d offset=%d', t, offset);
  }

  /**
   * Grow the refcount table to at least `minEntries`: a new, larger table and
   * the refcount blocks that describe it are written past the end of the file,
   * then the header is switched to it, then the old table is freed.
   */
  private async growTable(minEntries: number): Promise<void> {
    const perCluster = this.clusterSize / 8;
    const entries = Math.ceil(Math.max(minEntries, this.tableEntries * 2) / perCluster) * perCluster;
    const tableClusters = entries / perCluster;
    if (tableClusters * this.clusterSize > MAX_REFTABLE_BYTES) throw new VdiskError('ENOSPC', `qcow2: the refcount table would exceed ${MAX_REFTABLE_BYTES / 1024 / 1024} MiB`);
    const first = this.fileEnd / this.clusterSize;
    const newTable = Buffer.alloc(entries * 8);
    this.table.copy(newTable);
    // New blocks go first, the table after them; iterate until they cover the whole area.
    let blocks: number[] = [];
    for (;;) {
      const areaEnd = first + blocks.length + tableClusters;
      const need = new Set<number>();
      for (let c = first; c < areaEnd; c++) {
        const t = Math.floor(c / this.entriesPerBlock);
        if (t >= this.tableEntries || this.blockOffset(t) === 0) need.add(t);
      }
      if (need.size <= blocks.length) break;
      blocks = [...need].sort((a, b) => a - b);
    }
    const areaEnd = first + blocks.length + tableClusters;
    this.ranges?.assertFree(first * this.clusterSize, (areaEnd - first) * this.clusterSize, 'the grown refcount table');
    const newBlocks = new Map<number, Buffer>();
    blocks.forEach((t, k) => {
      newBlocks.set(t, Buffer.alloc(this.clusterSize));
      newTable.writeBigUInt64BE(BigInt((first + k) * this.clusterSize), t * 8);
    });
    for (let c = first; c < areaEnd; c++) {
      const t = Math.floor(c / this.entriesPerBlock);
      const nb = newBlocks.get(t);
      if (nb) this.writeEntry(nb, c % this.entriesPerBlock, 1);
      else await this.setExisting(c, 1);
    }
    for (const [k, t] of blocks.entries()) {
      await io.pwritev(this.file, (first + k) * this.clusterSize, this.clusterSize, [newBlocks.get(t)!]);
    }
    const tableOffset = (first + blocks.length) * this.clusterSize;
    await io.pwritev(this.file, tableOffset, newTable.length, [newTable]);
    await this.cache.writeDirty();
    await io.flush(this.file);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.fileEnd = Math.max(this.fileEnd, areaEnd * this.clusterSize);
    for (const [t, nb] of newBlocks) this.cache.install(readEntryOffset(newTable, t * 8), nb);
    this.ranges?.add(first * this.clusterSize, blocks.length * this.clusterSize, 'refcount block');
    this.ranges?.add(tableOffset, tableClusters * this.clusterSize, 'refcount table');
    await this.onTableMoved(tableOffset, tableClusters);
    this.deferFree(oldOffset, oldClusters);
    trace('refcount table grown entries=%d offset=%d', entries, tableOffset);
  }

  /** Drop one reference to `clusters` clusters at `offset`, once the tables that used them are on disk. */
  deferFree(offset: number, clusters = 1): void {
    for (let i = 0; i < clusters; i++) this.pendingFrees.push(offset / this.clusterSize + i);
  }

  /** Refcount changes not on disk yet: dirty blocks or held-back frees. */
  get hasUnwritten(): boolean {
    return this.cache.hasDirty || this.pendingFrees.length > 0;
  }

  get hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  /**
   * Apply the held-back decrements. Returns host offsets of clusters that are
   * now free, for the caller to punch out of the file.
   */
  async applyFrees(): Promise<number[]> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    const freed: number[] = [];
    for (const c of frees) {
      if ((await this.update(c, -1)) === 0) {
        freed.push(c * this.clusterSize);
        this.freeHint = Math.min(this.freeHint, c);
      }
    }
    return freed;
  }

  /** The end of the last cluster in use (bytes), scanning down from the end of the file. */
  async usedEnd(): Promise<number> {
    let c = this.fileEnd / this.clusterSize;
    while (c > 0 && (await this.get(c - 1)) === 0) c--;
    return c * this.clusterSize;
  }

  /** The file was truncated to `size`: nothing past it is allocated, and it reads as zero. */
  truncated(size: number): void {
    this.fileEnd = Math.ceil(size / this.clusterSize) * this.clusterSize;
  }

  /** Write dirty refcount blocks (increments are safe to persist at any time). */
  async writeDirty(): Promise<void> {
    await this.cache.writeDirty();
  }

  get cacheWantsFlush(): boolean {
    return this.cache.wantsFlush;
  }

  /** Direct refcount setting, for repair: creates blocks as needed. */
  async set(cluster: number, value: number): Promise<void> {
    await this.ensureBlock(Math.floor(cluster / this.entriesPerBlock));
    await this.setExisting(cluster, value);
  }

  /** Offset of refcount block `t` (0: none), for check's scan. */
  blockAt(t: number): number {
    return t < this.tableEntries ? this.blockOffset(t) : 0;
  }

  /**
   * The refcounts of block `t`'s clusters, read without I/O from the block as
   * it is now (check scans a block this way instead of awaiting every entry).
   * Valid until the next await: a repair may change or evict the block.
   */
  async blockReader(t: number): Promise<(i: number) => number> {
    const block = await this.cache.get(this.blockOffset(t));
    return (i) => this.readEntry(block, i);
  }

  /** Offsets of all refcount blocks, and the table's own clusters (for check). */
  metadataClusters(): Array<{ offset: number; clusters: number; what: string }> {
    const out = [{ offset: this.tableOffset, clusters: this.tableClusters, what: 'refcount table' }];
    for (let t = 0; t < this.tableEntries; t++) {
      const off = this.blockOffset(t);
      if (off) out.push({ offset: off, clusters: 1, what: `refcount block ${t}` });
    }
    return out;
  }
}
