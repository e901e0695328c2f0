/**
 * qcow2: the format driver. Reads map guest clusters through L1/L2 tables
 * (cached, bounded) to host clusters, zero clusters, compressed clusters or
 * the backing node; writes allocate clusters with refcounts and copy what
 * they do not overwrite; write-zeroes and discard are metadata where the
 * format allows.
 *
 * The open image is one shared state (state.ts); each job on it has its file:
 *   cluster-map.ts   guest offset -> L2 entry, block status
 *   read.ts          reads, compressed clusters included
 *   allocate.ts      the write path: cluster and L2 table allocation
 *   zero-discard.ts  write-zeroes and discard as metadata
 *   flush.ts         the ordered metadata write-out, and why it is crash safe
 *   check.ts         consistency check and repair
 *   reopen.ts        read-write and back (a job writing into a backing node)
 * This file opens the image and wires those to the BlockDriver interface.
 *
 * Concurrency: the request layer serialises writes that may allocate at
 * cluster granularity (mayAllocate/allocationAlignment), and metadata changes
 * take `metaLock`, so two allocations never interleave at an await.
 */
import type { BlockDriver, ChildLink, DriverBlockStatus, ZeroFlags } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import { displayName } from '../http/url.js';
import {
  EXT_BITMAPS,
  EXT_VDISK_OPTIONS,
  VDISK_OPT_COPY_ON_READ,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  MAX_CLUSTER_BITS,
  parseHeader,
  type Qcow2Header,
} from './header.js';
import { readL1Entry } from './l2-entry.js';
import { Refcounts } from './refcount.js';
import { TableCache } from './table-cache.js';
import { bitmapRanges, checkImage, type CheckResult, type RepairMode } from './check.js';
import { loadMetadataRanges } from './metadata-ranges.js';
import { Qcow2State } from './state.js';
import { blockStatus } from './cluster-map.js';
import { preadv } from './read.js';
import { mayAllocate, pwritev } from './allocate.js';
import { pdiscard, pwriteZeroes } from './zero-discard.js';
import { flush, flushCorrupt } from './flush.js';
import { reopenReadOnly, reopenWritable } from './reopen.js';

const trace = tracer('qcow2');

/** Default memory for cached L2 tables: 4 MiB of 8-byte entries map 32 GiB at 64 KiB clusters. */
export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
const REFCOUNT_CACHE_BYTES = 1024 * 1024;

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  l2CacheBytes?: number;
}

export class Qcow2Driver implements BlockDriver {
  readonly formatName = 'qcow2';
  readonly limits;
  readonly allocationAlignment: number;
  readonly discardLeaves = 'unallocated';
  /** Replaced whole by a read-write reopen (reopen.ts); every call reads it afresh. */
  private s: Qcow2State;
  /** The L2 cache a reopen's fresh state gets. */
  private readonly l2CacheBytes: number;

  private constructor(s: Qcow2State, l2CacheBytes: number) {
    this.s = s;
    this.l2CacheBytes = l2CacheBytes;
    this.allocationAlignment = s.clusterSize;
    this.limits = {
      requestAlignment: 512,
      maxTransfer: Math.max(s.clusterSize, 16 * 1024 * 1024),
      pwriteZeroesAlignment: s.subclusterSize,
      pdiscardAlignment: s.clusterSize,
    };
  }

  get readOnly(): boolean {
    return this.s.ro;
  }

  get header(): Qcow2Header {
    return this.s.header;
  }

  get warnings(): string[] {
    return this.s.warnings;
  }

  get clusterSize(): number {
    return this.s.clusterSize;
  }

  get extendedL2(): boolean {
    return this.s.extendedL2;
  }

  attach(node: BlockNode): void {
    this.s.node = node;
  }

  children(): ChildLink[] {
    return [{ role: 'file', node: this.s.file }];
  }

  static async open(file: BlockNode, options: Qcow2OpenOptions = {}): Promise<Qcow2Driver> {
    return new Qcow2Driver(await openState(file, options), options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES);
  }

  /**
   * Switch between read-only and read-write (graph.ts reopen: a commit job
   * writes into its backing node). Read-write is a fresh writable open of the
   * image on its host file, reopened with the writer's lock; read-only flushes
   * first. A reopen that fails leaves the node as it was (reopen.ts).
   */
  async reopen(readOnly: boolean): Promise<void> {
    if (readOnly === this.s.ro) return;
    if (readOnly) await reopenReadOnly(this.s);
    else this.s = await reopenWritable(this.s, (file) => openState(file, { readOnly: true, l2CacheBytes: this.l2CacheBytes }), prepareForWriting);
  }

  /** Why this open found the image corrupt (an overlap), or null. */
  get corrupt(): string | null {
    return this.s.corruptReason;
  }

  /** `vdisk check`: count references, compare refcounts, optionally repair. */
  check(repair: RepairMode = 'none'): Promise<CheckResult> {
    return checkImage(this.s, repair);
  }

  /** The header names another backing file (null: none); the graph's link is the caller's (graph.ts changeBackingFile). */
  async changeBackingFile(name: string | null, format: string | null): Promise<void> {
    const h = this.s.header;
    const { backingFile, backingFormat } = h;
    h.backingFile = name;
    h.backingFormat = name === null ? null : format;
    try {
      await this.s.writeHeader();
    } catch (err) {
      // A name that does not fit the header cluster leaves the image as it was.
      Object.assign(h, { backingFile, backingFormat });
      throw err;
    }
  }

  size(): number {
    return this.s.header.size;
  }

  /** The image asks for copy-on-read by default (vdisk create -o copy_on_read=on). */
  get copyOnReadDefault(): boolean {
    const ext = this.s.header.extensions.find((e) => e.type === EXT_VDISK_OPTIONS);
    return Boolean(ext && ext.data.length > 0 && ext.data[0]! & VDISK_OPT_COPY_ON_READ);
  }

  preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    return preadv(this.s, offset, bytes, iov);
  }

  /** May a write to this range allocate? Without I/O: true whenever its L2 table is not cached. */
  mayAllocate(offset: number, bytes: number): boolean {
    return mayAllocate(this.s, offset, bytes);
  }

  pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    return pwritev(this.s, offset, bytes, iov);
  }

  pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    return pwriteZeroes(this.s, offset, bytes, flags);
  }

  pdiscard(offset: number, bytes: number): Promise<void> {
    return pdiscard(this.s, offset, bytes);
  }

  blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    return blockStatus(this.s, offset, bytes);
  }

  /** The ordered metadata write-out (flush.ts says why in that order). */
  flush(): Promise<void> {
    return flush(this.s);
  }

  async allocatedBytes(): Promise<number> {
    return this.s.file.allocatedBytes();
  }

  async close(): Promise<void> {
    if (this.s.corruptReason) await flushCorrupt(this.s).catch(() => {});
    else if (!this.s.ro) await flush(this.s);
    await this.s.file.close();
  }
}

/** Read the image's header and tables into a state; a writable open also prepares the image for writing. */
async function openState(file: BlockNode, options: Qcow2OpenOptions): Promise<Qcow2State> {
  const fileSize = file.size();
  // The header, its extensions and the backing file name lie in the first cluster, at most this big.
  const head = Buffer.alloc(Math.min(fileSize, 2 ** MAX_CLUSTER_BITS));
  await io.preadv(file, 0, head.length, [head]);
  const header = parseHeader(head, fileSize);
  if (header.cryptMethod !== 0) throw new VdiskError('ERR_IMAGE_FORMAT', 'qcow2: encrypted images are not supported');
  if (header.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    throw new VdiskError('ERR_IMAGE_FORMAT', 'qcow2: images with an external data file are not supported');
  }
  let readOnly = options.readOnly ?? false;
  const warnings: string[] = [];
  if (header.incompatibleFeatures & INCOMPAT_CORRUPT) {
    if (!readOnly) warnings.push('the image is marked corrupt: opened read-only (vdisk check -r all repairs it)');
    readOnly = true;
  }
  const cs = 2 ** header.clusterBits;
  const l1 = Buffer.alloc(header.l1Size * 8);
  if (l1.length) await io.preadv(file, header.l1TableOffset, l1.length, [l1]);
  const l2Bytes = options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES;
  const l2Cache = new TableCache('l2', file, cs, Math.floor(l2Bytes / cs));
  const rcCache = new TableCache('refcount', file, cs, Math.floor(REFCOUNT_CACHE_BYTES / cs));
  let s: Qcow2State | null = null;
  const refcounts = await Refcounts.load(
    file,
    rcCache,
    { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
    fileSize,
    async (offset, clusters) => {
      header.refcountTableOffset = offset;
      header.refcountTableClusters = clusters;
      await s!.writeHeader();
    },
  );
  s = new Qcow2State(file, header, l1, refcounts, l2Cache, readOnly);
  s.warnings.push(...warnings);
  s.corruptBitOnly = !(options.readOnly ?? false) && Boolean(header.incompatibleFeatures & INCOMPAT_CORRUPT);
  validateL1(s, fileSize);
  await placeMetadata(s);
  if (!readOnly && !s.corruptReason) await prepareForWriting(s);
  trace('open size=%d cluster=%d extl2=%s version=%d backing=%s', header.size, cs, s.extendedL2, header.version, header.backingFile === null ? null : displayName(header.backingFile));
  return s;
}

function validateL1(s: Qcow2State, fileSize: number): void {
  for (let i = 0; i < s.header.l1Size; i++) {
    const { offset } = readL1Entry(s.l1, i);
    if (offset && (offset % s.clusterSize !== 0 || offset + s.clusterSize > fileSize)) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L1 entry ${i} points at ${offset}, outside the file or unaligned`);
    }
  }
}

/** Place every table; tables that overlap each other or the header make the image corrupt. */
async function placeMetadata(s: Qcow2State): Promise<void> {
  const h = s.header;
  const { ranges, overlaps } = await loadMetadataRanges(s.file, {
    clusterSize: s.clusterSize,
    l1TableOffset: h.l1TableOffset,
    l1Size: h.l1Size,
    l1: s.l1,
    refcountClusters: s.refcounts.metadataClusters(),
    nbSnapshots: h.nbSnapshots,
    snapshotsOffset: h.snapshotsOffset,
  });
  ranges.onCorrupt = (message) => s.corruption(message);
  s.metadataRanges = ranges;
  s.refcounts.ranges = ranges;
  if (overlaps.length) {
    s.corruption(overlaps[0]!);
    await s.corruptBitWrite;
    s.warnings.push(`the image is corrupt (${overlaps[0]}): ${s.ro ? 'only reads are served' : 'marked corrupt, writes are refused'} (vdisk check shows the damage)`);
  }
}

/**
 * Before the first write: clear autoclear bits we do not maintain (bitmaps
 * would go stale) and repair refcounts left inconsistent by a lazy-refcounts crash.
 */
export async function prepareForWriting(s: Qcow2State): Promise<void> {
  const h = s.header;
  let rewrite = false;
  // vdisk maintains no autoclear feature (bitmaps, raw data file, or any it does not know):
  // the spec says to clear them before writing.
  if (h.autoclearFeatures !== 0n) {
    h.autoclearFeatures = 0n;
    rewrite = true;
  }
  // Persistent dirty bitmaps would go stale under writes vdisk does not track:
  // drop them (header first, then their clusters) instead of leaving them to leak.
  const bitmaps = h.extensions.find((e) => e.type === EXT_BITMAPS);
  let bitmapClusters: number[] = [];
  if (bitmaps) {
    for (const r of await bitmapRanges(s, bitmaps.data)) {
      for (let c = Math.floor(r.offset / s.clusterSize); c < Math.ceil((r.offset + r.bytes) / s.clusterSize); c++) bitmapClusters.push(c);
    }
    bitmapClusters = [...new Set(bitmapClusters)];
    h.extensions = h.extensions.filter((e) => e !== bitmaps);
    s.warnings.push(`dropped its persistent dirty bitmaps (vdisk does not keep them up to date)`);
    rewrite = true;
  }
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
    s.warnings.push('the image was not closed cleanly (dirty bit): refcounts rebuilt');
    // The dirty bit: rebuild the refcounts, as check -r all does.
    const repaired = await checkImage(s, 'all');
    if (repaired.overlaps) {
      s.corruption(`${repaired.overlaps} data clusters overlap metadata: refcounts not rebuilt`);
      s.warnings.push('the image is corrupt (data clusters overlap metadata): marked corrupt, writes are refused');
      return;
    }
    h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    rewrite = true;
  }
  if (rewrite) await s.writeHeader();
  if (bitmapClusters.length) {
    for (const c of bitmapClusters) s.refcounts.deferFree(c * s.clusterSize);
    await flush(s);
  }
}
