/**
 * qcow2: the format driver. Reads map guest clusters through L1/L2 tables
 * (cached, bounded) to host clusters, zero clusters, compressed clusters or
 * the backing node; writes allocate clusters with refcounts and copy what
 * they do not overwrite; write-zeroes and discard are metadata where the
 * format allows.
 *
 * Update order, for crash safety (as QEMU keeps it; each arrow that says
 * flush is a host flush, because the host may reorder writes between flushes):
 *   data, refcount blocks          ->  flush
 *   L2 tables (new ones included)  ->  flush  (only when L1 changed too)
 *   L1 table                       ->  flush
 *   -> only then are freed clusters' refcounts dropped, flushed, and their space punched.
 * So an on-disk L2 entry never points at data or refcounts that are not on
 * disk, and an on-disk L1 entry never names an L2 table that is not: a new
 * table (possibly in a reused cluster, which holds stale bytes until it is
 * written) or the copy of a table shared with a snapshot. Allocating writes
 * only touch memory metadata after their data write has completed, and tables
 * reach the disk only in flush() (the caches never write out a dirty table on
 * eviction: too many dirty tables make the driver flush). Refcount blocks and
 * the refcount table keep their own order (refcount.ts), and the header is
 * rewritten only after what it names is flushed (writeHeader's callers).
 *
 * Concurrency: the request layer serialises writes that may allocate at
 * cluster granularity (mayAllocate/allocationAlignment), and metadata changes
 * take `metaLock`, so two allocations never interleave at an await.
 */
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import { Decompress } from 'fzstd';
import type { BlockDriver, DriverBlockStatus, ZeroFlags } from '../../block/driver.js';
import type { BlockNode } from '../../block/node.js';
import * as io from '../../block/io.js';
import { iovSlice, isZero } from '../../block/iov.js';
import { VdiskError, notSupported } from '../../errors.js';
import { tracer } from '../../trace.js';
import { displayName } from '../http/url.js';
import {
  EXT_BITMAPS,
  EXT_VDISK_OPTIONS,
  VDISK_OPT_COPY_ON_READ,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  parseHeader,
  serializeHeader,
  type Qcow2Header,
} from './header.js';
import { readL1Entry, readL2Entry, subclusterKind, writeL1Entry, writeL2Entry, type ClusterKind, type L2Entry } from './l2-entry.js';
import { Refcounts } from './refcount.js';
import { TableCache } from './table-cache.js';
import { Mutex } from './mutex.js';
import { bitmapRanges, repairImage } from './check.js';
import { loadMetadataRanges, MetadataRanges } from './metadata-ranges.js';
import { chainReadsZero } from '../../block/block-status.js';

const trace = tracer('qcow2');
/**
 * One zstd frame holding a cluster. The bytes after it belong to the next
 * compressed cluster, so decoding stops once the cluster is complete.
 */
function zstdCluster(raw: Buffer, clusterSize: number): Buffer {
  checkZstdFrameHeader(raw);
  const out = Buffer.alloc(clusterSize);
  let got = 0;
  const full = new Error('cluster complete');
  const d = new Decompress((chunk) => {
    const n = Math.min(chunk.length, clusterSize - got);
    out.set(chunk.subarray(0, n), got);
    got += n;
    // Stop as soon as the cluster is whole: what follows is never used, however much a frame claims.
    if (got === clusterSize) throw full;
  });
  try {
    d.push(raw, true);
  } catch (err) {
    if (got < clusterSize) throw err; // trailing bytes of the next cluster are not an error
  }
  if (got !== clusterSize) throw new Error(`zstd frame gave ${got} bytes`);
  return out;
}

/** The largest window (and content size) a cluster's frame may declare: a cluster is at most 2 MiB. */
const MAX_ZSTD_WINDOW = 2 * 1024 * 1024;

/**
 * The decoder allocates what the frame header declares (window, or content
 * size for a single-segment frame) before decoding a byte: read those fields
 * first and refuse more than a cluster could need. QEMU writes one plain frame
 * per cluster, so anything else (a skippable frame) is refused too.
 */
function checkZstdFrameHeader(raw: Buffer): void {
  if (raw.length < 6 || raw.readUInt32LE(0) !== 0xfd2fb528) throw new Error('not a zstd frame');
  const fhd = raw[4]!;
  const singleSegment = (fhd >> 5) & 1;
  const fcsFlag = fhd >> 6;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  let pos = 5;
  let window = 0;
  if (!singleSegment) {
    const wd = raw[pos++]!;
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  pos += dictBytes;
  const fcsBytes = fcsFlag ? 2 ** fcsFlag : singleSegment;
  if (raw.length < pos + fcsBytes) throw new Error('truncated zstd frame header');
  let contentSize = 0;
  for (let i = fcsBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + raw[pos + i]!;
  if (fcsBytes === 2) contentSize += 256;
  if (singleSegment) window = contentSize;
  if (window > MAX_ZSTD_WINDOW) throw new Error(`zstd frame declares a ${window}-byte window, over the ${MAX_ZSTD_WINDOW} a cluster can need`);
  if (contentSize > MAX_ZSTD_WINDOW) throw new Error(`zstd frame declares ${contentSize} bytes of content, over the ${MAX_ZSTD_WINDOW} a cluster can need`);
}

/** What an unmapped cluster looks like. */
const UNALLOCATED: L2Entry = Object.freeze({ host: 0, copied: false, compressed: false, zeroFlag: false, allocMask: 0, zeroMask: 0, compressedOffset: 0, compressedBytes: 0 });

/** Default memory for cached L2 tables (QEMU's default is 1 MiB of L2 per... this covers 32 GiB at 64 KiB clusters). */
export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
const REFCOUNT_CACHE_BYTES = 1024 * 1024;

export interface Qcow2OpenOptions {
  readOnly?: boolean;
  l2CacheBytes?: number;
}

interface Piece {
  kind: ClusterKind;
  bytes: number;
  /** Host offset of the first byte, for normal pieces. */
  host: number;
  entry: L2Entry;
}

export class Qcow2Driver implements BlockDriver {
  readonly formatName = 'qcow2';
  readonly limits;
  readonly file: BlockNode;
  readonly header: Qcow2Header;
  readonly warnings: string[] = [];
  backing: BlockNode | null = null;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly subclusterSize: number;
  readonly l2Entries: number;
  readonly allocationAlignment: number;
  readonly discardLeaves = 'unallocated';
  private ro: boolean;
  private l1: Buffer;
  private l1Dirty = false;
  readonly l2Cache: TableCache;
  readonly refcounts: Refcounts;
  private readonly metaLock = new Mutex();
  /** Where metadata lives: data writes, allocations and tables placed there would destroy the image. */
  metadataRanges: MetadataRanges;
  /** Why the image was found corrupt while open (writes are refused from then on), or null. */
  private corruptReason: string | null = null;
  private corruptBitWrite: Promise<void> | null = null;
  /** Opened read-only only because of the corrupt bit, though writable was asked: a repair may write. */
  private corruptBitOnly = false;
  private lastDecompressed: { host: number; data: Buffer } | null = null;

  private constructor(file: BlockNode, header: Qcow2Header, l1: Buffer, refcounts: Refcounts, l2Cache: TableCache, readOnly: boolean) {
    this.file = file;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.subclusterSize = this.extendedL2 ? this.clusterSize / 32 : this.clusterSize;
    this.l2Entries = this.clusterSize / (this.extendedL2 ? 16 : 8);
    this.l1 = l1;
    this.refcounts = refcounts;
    this.l2Cache = l2Cache;
    this.ro = readOnly;
    this.allocationAlignment = this.clusterSize;
    this.metadataRanges = new MetadataRanges(this.clusterSize);
    this.limits = {
      requestAlignment: 512,
      maxTransfer: Math.max(this.clusterSize, 16 * 1024 * 1024),
      pwriteZeroesAlignment: this.subclusterSize,
      pdiscardAlignment: this.clusterSize,
    };
  }

  get readOnly(): boolean {
    return this.ro;
  }

  static async open(file: BlockNode, options: Qcow2OpenOptions = {}): Promise<Qcow2Driver> {
    const fileSize = file.size();
    const head = Buffer.alloc(Math.min(fileSize, 2 * 1024 * 1024));
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
    let drv: Qcow2Driver | null = null;
    const refcounts = await Refcounts.load(
      file,
      rcCache,
      { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
      fileSize,
      async (offset, clusters) => {
        header.refcountTableOffset = offset;
        header.refcountTableClusters = clusters;
        await drv!.writeHeader();
      },
    );
    drv = new Qcow2Driver(file, header, l1, refcounts, l2Cache, readOnly);
    drv.warnings.push(...warnings);
    drv.corruptBitOnly = !(options.readOnly ?? false) && Boolean(header.incompatibleFeatures & INCOMPAT_CORRUPT);
    drv.validateL1(fileSize);
    await drv.loadMetadataRanges();
    if (!readOnly && !drv.corruptReason) await drv.prepareForWriting();
    trace('open size=%d cluster=%d extl2=%s version=%d backing=%s', header.size, cs, drv.extendedL2, header.version, header.backingFile === null ? null : displayName(header.backingFile));
    return drv;
  }

  private validateL1(fileSize: number): void {
    for (let i = 0; i < this.header.l1Size; i++) {
      const { offset } = readL1Entry(this.l1, i);
      if (offset && (offset % this.clusterSize !== 0 || offset + this.clusterSize > fileSize)) {
        throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L1 entry ${i} points at ${offset}, outside the file or unaligned`);
      }
    }
  }

  /** Place every table; tables that overlap each other or the header make the image corrupt. */
  private async loadMetadataRanges(): Promise<void> {
    const h = this.header;
    const { ranges, overlaps } = await loadMetadataRanges(this.file, {
      clusterSize: this.clusterSize,
      l1TableOffset: h.l1TableOffset,
      l1Size: h.l1Size,
      l1: this.l1,
      refcountClusters: this.refcounts.metadataClusters(),
      nbSnapshots: h.nbSnapshots,
      snapshotsOffset: h.snapshotsOffset,
    });
    ranges.onCorrupt = (message) => this.corruption(message);
    this.metadataRanges = ranges;
    this.refcounts.ranges = ranges;
    if (overlaps.length) {
      this.corruption(overlaps[0]!);
      await this.corruptBitWrite;
      this.warnings.push(`the image is corrupt (${overlaps[0]}): ${this.ro ? 'only reads are served' : 'marked corrupt, writes are refused'} (vdisk check shows the damage)`);
    }
  }

  /** Why this open found the image corrupt (an overlap), or null. */
  get corrupt(): string | null {
    return this.corruptReason;
  }

  /**
   * `check -r`: as with qemu-img check -r, the corrupt bit does not stop a
   * repair; an overlap found while open does. Returns whether repairs may write.
   */
  allowRepair(): boolean {
    if (this.corruptReason) return false;
    if (this.corruptBitOnly) this.ro = false;
    this.corruptBitOnly = false;
    return !this.ro;
  }

  /** A repair left nothing to fix: clear the corrupt bit (as qemu-img check -r does). */
  async markConsistent(): Promise<void> {
    if (this.ro || this.corruptReason || !(this.header.incompatibleFeatures & INCOMPAT_CORRUPT)) return;
    this.header.incompatibleFeatures &= ~INCOMPAT_CORRUPT;
    await this.writeHeader();
  }

  /**
   * Metadata overlap found: as QEMU does, mark the image corrupt (incompatible
   * bit 1, when writable) and refuse every write from now on, so that nothing
   * more is written through tables that alias each other. Returns the error to throw.
   */
  private corruption(message: string): VdiskError {
    if (!this.corruptReason) {
      this.corruptReason = message;
      trace('corrupt: %s', message);
      if (!this.ro && !(this.header.incompatibleFeatures & INCOMPAT_CORRUPT)) {
        this.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
        this.corruptBitWrite = this.writeHeader().catch((err: unknown) => trace('setting the corrupt bit failed: %s', (err as Error).message));
      }
    }
    return new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: ${message}`);
  }

  /**
   * Before the first write: clear autoclear bits we do not maintain (bitmaps
   * would go stale) and repair refcounts left inconsistent by a lazy-refcounts crash.
   */
  private async prepareForWriting(): Promise<void> {
    const h = this.header;
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
      for (const r of await bitmapRanges(this, bitmaps.data)) {
        for (let c = Math.floor(r.offset / this.clusterSize); c < Math.ceil((r.offset + r.bytes) / this.clusterSize); c++) bitmapClusters.push(c);
      }
      bitmapClusters = [...new Set(bitmapClusters)];
      h.extensions = h.extensions.filter((e) => e !== bitmaps);
      this.warnings.push(`dropped its persistent dirty bitmaps (vdisk does not keep them up to date)`);
      rewrite = true;
    }
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      this.warnings.push('the image was not closed cleanly (dirty bit): refcounts rebuilt');
      const repaired = await repairImage(this, 'all');
      if (repaired.overlaps) {
        this.corruption(`${repaired.overlaps} data clusters overlap metadata: refcounts not rebuilt`);
        this.warnings.push('the image is corrupt (data clusters overlap metadata): marked corrupt, writes are refused');
        return;
      }
      h.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      rewrite = true;
    }
    if (rewrite) await this.writeHeader();
    if (bitmapClusters.length) {
      for (const c of bitmapClusters) this.refcounts.deferFree(c * this.clusterSize);
      await this.flush();
    }
  }

  /** Rewrite the header cluster's metadata area (extensions preserved), then flush. */
  async writeHeader(): Promise<void> {
    const buf = serializeHeader(this.header);
    await io.pwritev(this.file, 0, buf.length, [buf]);
    await io.flush(this.file);
  }

  /**
   * Stand alone: the header stops naming a backing file, then the link goes.
   * The caller has made sure nothing reads through any more. Returns the old
   * backing node, for the caller to close.
   */
  async dropBackingFile(): Promise<BlockNode | null> {
    this.header.backingFile = null;
    this.header.backingFormat = null;
    await this.writeHeader();
    const old = this.backing;
    this.backing = null;
    return old;
  }

  size(): number {
    return this.header.size;
  }

  /** The image asks for copy-on-read by default (vdisk create -o copy_on_read=on). */
  get copyOnReadDefault(): boolean {
    const ext = this.header.extensions.find((e) => e.type === EXT_VDISK_OPTIONS);
    return Boolean(ext && ext.data.length > 0 && ext.data[0]! & VDISK_OPT_COPY_ON_READ);
  }

  get l1Table(): Buffer {
    return this.l1;
  }

  /** The in-memory L1 changed (repair): write it at the next flush. */
  markL1Dirty(): void {
    this.l1Dirty = true;
  }

  // -------------------------------------------------------------------------
  // Mapping

  /** The L2 table for guest cluster `cluster`, or null when the L1 entry is empty. */
  private async l2For(cluster: number): Promise<{ table: Buffer; offset: number } | null> {
    const l1Index = Math.floor(cluster / this.l2Entries);
    if (l1Index >= this.header.l1Size) return null;
    const { offset } = readL1Entry(this.l1, l1Index);
    if (!offset) return null;
    return { table: await this.l2Cache.get(offset), offset };
  }

  async entryFor(cluster: number): Promise<L2Entry | null> {
    const cached = this.cachedEntryFor(cluster);
    return cached !== undefined ? cached : this.loadEntry(cluster);
  }

  /** The entry, reading its L2 table into the cache. */
  private async loadEntry(cluster: number): Promise<L2Entry | null> {
    const l2 = await this.l2For(cluster);
    if (!l2) return null;
    const e = readL2Entry(l2.table, cluster % this.l2Entries, this.extendedL2, this.clusterBits);
    this.checkEntry(e, cluster);
    return e;
  }

  /** The entry without I/O: null if unmapped, undefined if its L2 table is not cached. */
  private cachedEntryFor(cluster: number): L2Entry | null | undefined {
    const l1Index = Math.floor(cluster / this.l2Entries);
    if (l1Index >= this.header.l1Size) return null;
    const { offset } = readL1Entry(this.l1, l1Index);
    if (!offset) return null;
    const table = this.l2Cache.peek(offset);
    if (!table) return undefined;
    const e = readL2Entry(table, cluster % this.l2Entries, this.extendedL2, this.clusterBits);
    this.checkEntry(e, cluster);
    return e;
  }

  private checkEntry(e: L2Entry, cluster: number): void {
    const end = Math.max(this.refcounts.fileEnd, this.file.size());
    if (e.compressed) {
      if (e.compressedOffset + e.compressedBytes > end + this.clusterSize || e.compressedBytes > 2 * this.clusterSize + 512) {
        throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster ${cluster} points outside the file`);
      }
    } else if (e.host) {
      if (e.host % this.clusterSize !== 0) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L2 entry of cluster ${cluster} has unaligned offset ${e.host}`);
      if (e.host + this.clusterSize > end) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: L2 entry of cluster ${cluster} points past the end of the file (${e.host})`);
      this.metadataRanges.assertFree(e.host, this.clusterSize, `the data of guest cluster ${cluster}`);
    }
  }

  /** The longest prefix of [offset, offset+bytes) inside one cluster with one kind. */
  private async piece(offset: number, bytes: number): Promise<Piece> {
    const cluster = Math.floor(offset / this.clusterSize);
    const cached = this.cachedEntryFor(cluster);
    // The common case (L2 table cached) answers without awaiting anything.
    return this.pieceOf(offset, bytes, cached === undefined ? await this.loadEntry(cluster) : cached);
  }

  private pieceOf(offset: number, bytes: number, found: L2Entry | null): Piece {
    const inCluster = offset % this.clusterSize;
    const entry = found ?? UNALLOCATED;
    const clusterRest = Math.min(bytes, this.clusterSize - inCluster);
    const sc = Math.floor(inCluster / this.subclusterSize);
    const kind = subclusterKind(entry, sc, this.extendedL2);
    let n = Math.min(clusterRest, (sc + 1) * this.subclusterSize - inCluster);
    for (let next = sc + 1; n < clusterRest && subclusterKind(entry, next, this.extendedL2) === kind; next++) {
      n = Math.min(clusterRest, (next + 1) * this.subclusterSize - inCluster);
    }
    return { kind, bytes: n, host: kind === 'normal' ? entry.host + inCluster : 0, entry };
  }

  // -------------------------------------------------------------------------
  // Reads

  async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    for (let done = 0; done < bytes; ) {
      const p = await this.piece(offset + done, bytes - done);
      // Coalesce host-contiguous normal pieces into one file read.
      let n = p.bytes;
      while (p.kind === 'normal' && done + n < bytes) {
        const q = await this.piece(offset + done + n, bytes - done - n);
        if (q.kind !== 'normal' || q.host !== p.host + n) break;
        n += q.bytes;
      }
      await this.readPiece({ ...p, bytes: n }, offset + done, iovSlice(iov, done, n));
      done += n;
    }
  }

  private async readPiece(p: Piece, guestOffset: number, dst: Buffer[]): Promise<void> {
    switch (p.kind) {
      case 'normal':
        return io.preadv(this.file, p.host, p.bytes, dst);
      case 'zero':
        for (const b of dst) b.fill(0);
        return;
      case 'unallocated':
        return this.readBacking(guestOffset, p.bytes, dst);
      case 'compressed': {
        const data = await this.decompress(p.entry);
        let pos = guestOffset % this.clusterSize;
        for (const b of dst) {
          data.copy(b, 0, pos, pos + b.length);
          pos += b.length;
        }
      }
    }
  }

  /** Read from the backing node (the request layer zeroes what lies past its end). */
  readBacking(offset: number, bytes: number, dst: Buffer[]): Promise<void> {
    return io.readBacking(this.backing, offset, bytes, dst);
  }

  private async decompress(e: L2Entry): Promise<Buffer> {
    if (this.lastDecompressed?.host === e.compressedOffset) return this.lastDecompressed.data;
    const fileEnd = this.file.size();
    const n = Math.max(0, Math.min(e.compressedBytes, fileEnd - e.compressedOffset));
    const raw = Buffer.alloc(n);
    if (n) await io.preadv(this.file, e.compressedOffset, n, [raw]);
    let data: Buffer;
    try {
      data = this.header.compressionType === 1 ? zstdCluster(raw, this.clusterSize) : inflateRawSync(raw, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize });
    } catch (err) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster at ${e.compressedOffset} does not decompress: ${(err as Error).message}`);
    }
    if (data.length !== this.clusterSize) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster at ${e.compressedOffset} inflates to ${data.length} bytes, not ${this.clusterSize}`);
    }
    this.lastDecompressed = { host: e.compressedOffset, data };
    return data;
  }

  // -------------------------------------------------------------------------
  // Writes

  /** May a write to this range allocate? Without I/O: true whenever its L2 table is not cached. */
  mayAllocate(offset: number, bytes: number): boolean {
    for (let c = Math.floor(offset / this.clusterSize); c * this.clusterSize < offset + bytes; c++) {
      const e = this.cachedEntryFor(c);
      if (!e) return true;
      const from = Math.max(offset, c * this.clusterSize);
      const to = Math.min(offset + bytes, (c + 1) * this.clusterSize);
      if (!this.canWriteInPlace(e, from, to - from)) return true;
    }
    return false;
  }

  async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    this.checkWritable();
    const cs = this.clusterSize;
    for (let done = 0; done < bytes; ) {
      const pos = offset + done;
      // Whole clusters that need new host clusters: one allocation, one data write.
      if (pos % cs === 0 && bytes - done >= cs) {
        const written = await this.allocateWholeClusters(pos / cs, Math.floor((bytes - done) / cs), iovSlice(iov, done, bytes - done));
        if (written) {
          done += written;
          continue;
        }
      }
      const n = Math.min(bytes - done, cs - (pos % cs));
      await this.writeInCluster(pos, n, iovSlice(iov, done, n));
      done += n;
    }
    await this.flushIfCacheFull();
  }

  /**
   * Up to `max` guest clusters from `first` that the write covers entirely and
   * that cannot be written in place get one contiguous run of new host
   * clusters: nothing of their old contents survives, so nothing is copied.
   * Returns the bytes written (0: the first cluster is writable in place).
   */
  private async allocateWholeClusters(first: number, max: number, data: Buffer[]): Promise<number> {
    // Reserve under the lock, write the data without it (the request layer keeps
    // other writers of these guest clusters away), then link the clusters in.
    const plan = await this.metaLock.run(async () => {
      let n = 0;
      const old: L2Entry[] = [];
      while (n < max && n < 256) {
        const e = (await this.entryFor(first + n)) ?? UNALLOCATED;
        if (this.canWriteInPlace(e, (first + n) * this.clusterSize, this.clusterSize)) break;
        // Stay inside one L2 table so that the entries are updated in one go.
        if (n > 0 && Math.floor((first + n) / this.l2Entries) !== Math.floor(first / this.l2Entries)) break;
        old.push(e);
        n++;
      }
      if (!n) return null;
      const host = await this.refcounts.allocate(n);
      this.checkNoMetadata(host.offset);
      return { n, old, host };
    });
    if (!plan) return 0;
    const bytes = plan.n * this.clusterSize;
    await io.pwritev(this.file, plan.host.offset, bytes, iovSlice(data, 0, bytes));
    await this.metaLock.run(async () => {
      const { table, offset } = await this.l2TableForWrite(first);
      for (let i = 0; i < plan.n; i++) {
        writeL2Entry(table, (first + i) % this.l2Entries, this.extendedL2, {
          host: plan.host.offset + i * this.clusterSize,
          copied: true,
          allocMask: 0xffffffff,
          zeroMask: 0,
        });
      }
      this.l2Cache.markDirty(offset, table);
      for (const e of plan.old) this.freeOldCluster(e);
    });
    return bytes;
  }


  private checkWritable(): void {
    if (this.ro) throw new VdiskError('EROFS', 'qcow2 image opened read-only');
    if (this.corruptReason) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: the image is corrupt (${this.corruptReason}): writes are refused`);
  }

  /** Write [offset, offset+bytes) inside one guest cluster. */
  private async writeInCluster(offset: number, bytes: number, data: Buffer[]): Promise<void> {
    const cluster = Math.floor(offset / this.clusterSize);
    const e = await this.entryFor(cluster);
    if (e && this.canWriteInPlace(e, offset, bytes)) {
      this.checkNoMetadata(e.host);
      return io.pwritev(this.file, e.host + (offset % this.clusterSize), bytes, data);
    }
    await this.metaLock.run(() => this.allocatingWrite(cluster, offset, bytes, data));
  }

  private canWriteInPlace(e: L2Entry, offset: number, bytes: number): boolean {
    if (e.compressed || !e.host || !e.copied || e.zeroFlag) return false;
    if (!this.extendedL2) return true;
    const inCluster = offset % this.clusterSize;
    for (let sc = Math.floor(inCluster / this.subclusterSize); sc * this.subclusterSize < inCluster + bytes; sc++) {
      if (!(e.allocMask & 2 ** sc)) return false;
    }
    return true;
  }

  private checkNoMetadata(host: number): void {
    this.metadataRanges.assertFree(host, this.clusterSize, 'a data write');
  }

  /**
   * A write that needs a new host cluster (or new subclusters): build the
   * cluster's new contents from the request and whatever it does not cover
   * (read through this node: old data, zeroes, compressed data or the backing),
   * write it, then point the L2 entry at it and drop the old cluster.
   */
  private async allocatingWrite(cluster: number, offset: number, bytes: number, data: Buffer[]): Promise<void> {
    const cs = this.clusterSize;
    const scs = this.subclusterSize;
    const base = cluster * cs;
    const old = (await this.entryFor(cluster)) ?? UNALLOCATED;
    if (this.canWriteInPlace(old, offset, bytes)) {
      // Someone allocated it while we waited for the lock.
      this.checkNoMetadata(old.host);
      return io.pwritev(this.file, old.host + (offset - base), bytes, data);
    }

    // Which subclusters the new host cluster must hold valid data for.
    const first = Math.floor((offset - base) / scs);
    const last = Math.floor((offset + bytes - 1 - base) / scs);
    const nsc = cs / scs;
    const reuseHost = Boolean(old.host && old.copied && !old.compressed && this.extendedL2 && !old.zeroFlag);
    let keepMask = 0; // subclusters whose old data must be carried into a new cluster
    if (!reuseHost) {
      for (let sc = 0; sc < nsc; sc++) {
        if (sc >= first && sc <= last) continue;
        const kind = subclusterKind(old, sc, this.extendedL2);
        // Without subclusters every byte of the cluster lives in the new host cluster.
        if (!this.extendedL2 || kind === 'normal' || kind === 'compressed') keepMask |= 2 ** sc;
      }
    }

    const host = reuseHost ? { offset: old.host, fresh: false } : await this.refcounts.allocate(1);
    this.checkNoMetadata(host.offset);
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
      if (reqFrom > from) await this.preadv(base + from, reqFrom - from, [buf.subarray(from, reqFrom)]);
      if (reqTo < to) await this.preadv(base + Math.max(reqTo, from), to - Math.max(reqTo, from), [buf.subarray(Math.max(reqTo, from), to)]);
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
      await io.pwritev(this.file, host.offset + from, to - from, [seg]);
    }
    // A cluster must lie inside the file even when nothing was written to its end.
    await this.coverInFile(host.offset + cs);

    // The data is written: now the L2 entry may point at it.
    let allocMask = old.allocMask;
    let zeroMask = old.zeroMask;
    if (this.extendedL2) {
      if (!reuseHost) allocMask = old.compressed ? 0 : old.host ? 0 : allocMask; // a new cluster holds only what we copied
      for (let sc = 0; sc < nsc; sc++) {
        if ((sc >= first && sc <= last) || keepMask & 2 ** sc) {
          allocMask |= 2 ** sc;
          zeroMask &= ~(2 ** sc);
        }
      }
    }
    await this.setL2Entry(cluster, { host: host.offset, copied: true, zeroFlag: false, allocMask: allocMask >>> 0, zeroMask: zeroMask >>> 0 });
    if (!reuseHost) this.freeOldCluster(old);
  }

  /** Grow the host file (sparsely) so that it reaches `end`. */
  private async coverInFile(end: number): Promise<void> {
    if (this.file.size() >= end) return;
    const fileDriver = this.file.driver;
    if (fileDriver.truncate) await fileDriver.truncate(end);
    else await io.pwritev(this.file, end - 512, 512, [Buffer.alloc(512)]);
  }

  /** Drop the reference an old L2 entry held (after the new entry is durable). */
  private freeOldCluster(old: L2Entry): void {
    if (old.compressed) {
      const first = Math.floor(old.compressedOffset / this.clusterSize);
      const last = Math.floor((old.compressedOffset + old.compressedBytes - 1) / this.clusterSize);
      for (let c = first; c <= last; c++) this.refcounts.deferFree(c * this.clusterSize);
    } else if (old.host) {
      this.refcounts.deferFree(old.host);
    }
  }

  /** Point guest cluster `cluster` at a new entry, allocating or un-sharing its L2 table first. */
  private async setL2Entry(cluster: number, entry: { host: number; copied: boolean; zeroFlag?: boolean; allocMask?: number; zeroMask?: number }): Promise<void> {
    const { table, offset } = await this.l2TableForWrite(cluster);
    writeL2Entry(table, cluster % this.l2Entries, this.extendedL2, entry);
    this.l2Cache.markDirty(offset, table);
  }

  /**
   * The L2 table of `cluster`, ready to be changed: allocated if the L1 entry is
   * empty, copied first if it is shared with a snapshot. Callers change entries
   * synchronously and then mark it dirty.
   */
  private async l2TableForWrite(cluster: number): Promise<{ table: Buffer; offset: number }> {
    const l1Index = Math.floor(cluster / this.l2Entries);
    const l1e = readL1Entry(this.l1, l1Index);
    if (!l1e.offset) {
      const { offset } = await this.refcounts.allocate(1);
      const table = Buffer.alloc(this.clusterSize);
      this.l2Cache.install(offset, table);
      this.metadataRanges.addTable(offset, this.clusterSize, 'L2 table');
      writeL1Entry(this.l1, l1Index, offset, true);
      this.l1Dirty = true;
      return { table, offset };
    }
    let table = await this.l2Cache.get(l1e.offset);
    if (l1e.copied) return { table, offset: l1e.offset };
    if ((await this.refcounts.get(l1e.offset / this.clusterSize)) === 1) {
      writeL1Entry(this.l1, l1Index, l1e.offset, true);
      this.l1Dirty = true;
      return { table, offset: l1e.offset };
    }
    // Shared with a snapshot: copy the table before changing it.
    const { offset } = await this.refcounts.allocate(1);
    table = Buffer.from(table);
    this.l2Cache.install(offset, table);
    this.refcounts.deferFree(l1e.offset);
    this.metadataRanges.addTable(offset, this.clusterSize, 'L2 table');
    writeL1Entry(this.l1, l1Index, offset, true);
    this.l1Dirty = true;
    return { table, offset };
  }

  /** Bounded memory: too many dirty tables means a flush now. */
  private async flushIfCacheFull(): Promise<void> {
    if (this.l2Cache.wantsFlush || this.refcounts.cacheWantsFlush) await this.flush();
  }

  // -------------------------------------------------------------------------
  // Write-zeroes and discard

  /**
   * Whole clusters (or subclusters) become zero in metadata. A partial cluster
   * becomes a zero cluster if the rest of it already reads as zero through the
   * whole chain (seed 004); otherwise its zeroes are written as data.
   */
  async pwriteZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    this.checkWritable();
    // v2 has no zero clusters: a range zero below stays unallocated, reading through.
    if (flags.allocate && this.header.version === 2) throw notSupported('zero clusters in a compat=0.10 image');
    const cs = this.clusterSize;
    const unit = this.subclusterSize;
    const mayUnmap = Boolean(flags.mayUnmap);
    for (let done = 0; done < bytes; ) {
      const pos = offset + done;
      const cluster = Math.floor(pos / cs);
      // v3: whole clusters become zero clusters a table at a time, without per-cluster awaits.
      if (this.header.version === 3 && pos % cs === 0 && bytes - done >= cs) {
        const n = await this.metaLock.run(() => this.zeroWholeClusters(cluster, Math.floor((bytes - done) / cs), mayUnmap));
        done += n * cs;
        await this.flushIfCacheFull();
        continue;
      }
      const n = Math.min(bytes - done, (cluster + 1) * cs - pos);
      await this.metaLock.run(() => this.zeroInCluster(cluster, pos, n, mayUnmap, unit));
      done += n;
    }
    await this.flushIfCacheFull();
  }

  /** Zero up to `max` whole clusters from `first`, within one L2 table; returns how many. */
  private async zeroWholeClusters(first: number, max: number, mayUnmap: boolean): Promise<number> {
    const n = Math.min(max, this.l2Entries - (first % this.l2Entries));
    const { table, offset } = await this.l2TableForWrite(first);
    for (let i = 0; i < n; i++) {
      const index = (first + i) % this.l2Entries;
      const old = readL2Entry(table, index, this.extendedL2, this.clusterBits);
      this.checkEntry(old, first + i);
      // Keep a host cluster we own unless asked to unmap (preallocated zeroes).
      const keepHost = !mayUnmap && Boolean(old.host) && old.copied && !old.compressed;
      if (this.extendedL2) {
        writeL2Entry(table, index, true, { host: keepHost ? old.host : 0, copied: keepHost, allocMask: 0, zeroMask: 0xffffffff });
      } else {
        writeL2Entry(table, index, false, { host: keepHost ? old.host : 0, copied: keepHost, zeroFlag: true });
      }
      if (!keepHost) this.freeOldCluster(old);
    }
    this.l2Cache.markDirty(offset, table);
    return n;
  }

  private async zeroInCluster(cluster: number, offset: number, bytes: number, mayUnmap: boolean, unit: number): Promise<void> {
    const base = cluster * this.clusterSize;
    const old = (await this.entryFor(cluster)) ?? UNALLOCATED;
    // The request layer hands whole units only (pwriteZeroesAlignment); the last one may end at the end of the image.
    const from = offset - base;
    let to = from + bytes;
    if (offset + bytes === this.header.size) to = Math.min(this.clusterSize, Math.ceil(to / unit) * unit);
    if (this.header.version === 2) return this.zeroV2(cluster, old, from, to);
    // A whole cluster (always so without subclusters: unit = cluster) is the table-at-a-time case.
    if (from === 0 && to === this.clusterSize) {
      await this.zeroWholeClusters(cluster, 1, mayUnmap);
      return;
    }
    // Part of a cluster with subclusters.
    if (old.compressed) {
      // Compressed clusters have no subclusters: the untouched part must survive as data.
      const rest = Buffer.alloc(this.clusterSize);
      await this.preadv(base, this.clusterSize, [rest]);
      rest.fill(0, from, to);
      await this.allocatingWrite(cluster, base, this.clusterSize, [rest]);
      return;
    }
    let allocMask = old.allocMask;
    let zeroMask = old.zeroMask;
    for (let sc = from / unit; sc < to / unit; sc++) {
      allocMask &= ~(2 ** sc);
      zeroMask |= 2 ** sc;
    }
    const freeHost = allocMask === 0 && (mayUnmap || !old.copied);
    await this.setL2Entry(cluster, {
      host: freeHost ? 0 : old.host,
      copied: !freeHost && old.copied && Boolean(old.host),
      allocMask: allocMask >>> 0,
      zeroMask: zeroMask >>> 0,
    });
    if (freeHost) this.freeOldCluster(old);
  }

  /** Version 2 has no zero flag: unallocated reads zero only if nothing below shows through. */
  private async zeroV2(cluster: number, old: L2Entry, from: number, to: number): Promise<void> {
    const base = cluster * this.clusterSize;
    const backingZero = await this.backingReadsZero(base, this.clusterSize);
    if (backingZero) {
      if (old.host || old.compressed) {
        await this.setL2Entry(cluster, { host: 0, copied: false });
        this.freeOldCluster(old);
      }
      return;
    }
    await this.allocatingWrite(cluster, base + from, to - from, [Buffer.alloc(to - from)]);
  }

  private backingReadsZero(offset: number, bytes: number): Promise<boolean> {
    return chainReadsZero(this.backing, offset, bytes);
  }

  /**
   * Free whole clusters: they become unallocated and read through to the
   * backing node (discardLeaves). Whether that leaves zeroes is the request
   * layer's question (io.discardLeavesZeroes), not this driver's.
   */
  async pdiscard(offset: number, bytes: number): Promise<void> {
    this.checkWritable();
    for (let pos = offset; pos < offset + bytes; pos += this.clusterSize) {
      const cluster = Math.floor(pos / this.clusterSize);
      await this.metaLock.run(async () => {
        const old = await this.entryFor(cluster);
        if (!old || (!old.host && !old.compressed && !old.zeroFlag && !old.zeroMask)) return;
        await this.setL2Entry(cluster, { host: 0, copied: false });
        this.freeOldCluster(old);
      });
    }
    await this.flushIfCacheFull();
  }

  // -------------------------------------------------------------------------
  // Block status

  /**
   * One answer covers a run of empty L1 entries, or a run of one kind within
   * one L2 table (read once, then scanned without I/O): the cost of walking a
   * disk follows its allocated metadata, not its virtual size.
   */
  async blockStatus(offset: number, bytes: number): Promise<DriverBlockStatus> {
    const tableSpan = this.clusterSize * this.l2Entries;
    const end = offset + bytes;
    let l1Index = Math.floor(offset / tableSpan);
    while (l1Index < this.header.l1Size && l1Index * tableSpan < end && !readL1Entry(this.l1, l1Index).offset) l1Index++;
    const unmappedEnd = l1Index >= this.header.l1Size ? end : Math.min(end, l1Index * tableSpan);
    if (unmappedEnd > offset) return { bytes: unmappedEnd - offset, allocated: false, zero: !this.backing, data: false };
    const table = await this.l2Cache.get(readL1Entry(this.l1, l1Index).offset);
    const tableEnd = Math.min(end, (l1Index + 1) * tableSpan);
    const pieceAt = (pos: number): Piece => {
      const cluster = Math.floor(pos / this.clusterSize);
      const e = readL2Entry(table, cluster % this.l2Entries, this.extendedL2, this.clusterBits);
      this.checkEntry(e, cluster);
      return this.pieceOf(pos, tableEnd - pos, e);
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
        return { bytes: n, allocated: false, zero: !this.backing, data: false };
    }
  }

  // -------------------------------------------------------------------------
  // Flush and close

  /** The ordered metadata write-out described at the top of this file. */
  async flush(): Promise<void> {
    if (this.ro) return;
    if (this.corruptReason) return this.flushCorrupt();
    await this.metaLock.run(async () => {
      // Refcounts (of new data clusters and of new L2 tables) and the data are
      // stable before any table that uses them is written.
      await this.refcounts.writeDirty();
      await io.flush(this.file);
      const l2Written = await this.l2Cache.writeDirty();
      let l1Written = false;
      if (this.l1Dirty) {
        // The L2 tables an L1 entry may name for the first time are stable before
        // it: without this flush the host may write L1 first, and a power cut
        // leaves L1 naming a cluster past the end of the file or one with stale bytes.
        if (l2Written) await io.flush(this.file);
        this.l1Dirty = false;
        await io.pwritev(this.file, this.header.l1TableOffset, this.l1.length, [Buffer.from(this.l1)]);
        l1Written = true;
      }
      // Stable before flush() returns, and before frees drop what the old tables used.
      if (l2Written || l1Written || this.refcounts.hasPendingFrees) await io.flush(this.file);
      if (this.refcounts.hasPendingFrees) await this.releaseFreed();
    });
  }

  /** Apply held-back frees, give their space back to the host, shrink the file if its end is free. */
  private async releaseFreed(): Promise<void> {
    const freed = await this.refcounts.applyFrees();
    for (const off of freed) {
      this.metadataRanges.remove(off, this.clusterSize);
      this.l2Cache.drop(off);
    }
    await this.refcounts.writeDirty();
    await io.flush(this.file);
    for (const off of freed) {
      try {
        await io.pdiscard(this.file, off, Math.min(this.clusterSize, Math.max(0, this.file.size() - off)));
      } catch {
        // Returning space is best effort.
      }
    }
    const usedEnd = await this.refcounts.usedEnd();
    const fileDriver = this.file.driver as { truncate?: (size: number) => Promise<void> };
    if (usedEnd < this.file.size() && fileDriver.truncate) {
      await fileDriver.truncate(usedEnd);
      this.refcounts.truncated(usedEnd);
      trace('file shrunk to %d', usedEnd);
    }
  }

  async allocatedBytes(): Promise<number> {
    return (await this.file.driver.allocatedBytes?.()) ?? this.file.size();
  }

  /**
   * A corrupt image gets no more metadata writes (they could land in aliased
   * tables): a flush succeeds only if nothing is left unwritten.
   */
  private async flushCorrupt(): Promise<void> {
    await this.corruptBitWrite;
    if (this.l1Dirty || this.l2Cache.hasDirty || this.refcounts.hasUnwritten) {
      throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: the image is corrupt (${this.corruptReason}): metadata changes are not written`);
    }
    await io.flush(this.file);
  }

  async close(): Promise<void> {
    if (this.corruptReason) await this.flushCorrupt().catch(() => {});
    else if (!this.ro) await this.flush();
    await this.file.close();
  }
}
