/**
 * The driver contract. A driver is one open image (or protocol) instance; the
 * generic request layer (io.ts) is the only caller of these methods and
 * guarantees, for every call:
 *  - offset and bytes are multiples of `limits.requestAlignment`;
 *  - bytes > 0 and bytes <= `limits.maxTransfer` (reads and writes);
 *  - the range lies within `size()`;
 *  - `iov` holds exactly `bytes` bytes; the buffers may be the client's own memory.
 * Optional operations may be absent, or throw a VdiskError with code ENOTSUP,
 * and the request layer emulates them (QEMU's -ENOTSUP convention).
 */

export interface BlockLimits {
  /** Every request reaching the driver is aligned to this (power of two). */
  requestAlignment: number;
  /** Largest read/write handed to the driver in one call. */
  maxTransfer: number;
  /**
   * The write-zeroes unit (e.g. the cluster or subcluster size). The request
   * layer hands the driver whole units only (the last one may end at the end
   * of the node); partial units follow its rule (block/write-zeroes.ts).
   */
  pwriteZeroesAlignment: number;
  /** Largest single write-zeroes call. */
  maxPwriteZeroes: number;
  /** Discards are rounded inward to this. */
  pdiscardAlignment: number;
  /** Largest single discard call. */
  maxPdiscard: number;
}

export interface ZeroFlags {
  /** The node may free the space (the range must still read as zero). */
  mayUnmap?: boolean;
  /**
   * The range must be this node's afterwards, not left to read through to the
   * backing chain (copy-on-read). A driver that cannot promise it throws
   * ENOTSUP, and zeroes are written as data.
   */
  allocate?: boolean;
}

/** Status of a prefix of the asked range, as the driver sees it. */
export interface DriverBlockStatus {
  /** Length of the prefix this answer covers (> 0, aligned, at most what was asked). */
  bytes: number;
  /** This node itself defines the content (false: it comes from the backing node). */
  allocated: boolean;
  /** The range reads as zero. */
  zero: boolean;
  /** The range is backed by data in this node's storage. */
  data: boolean;
  /** Where the data lives in the node's host file, when that is meaningful. */
  hostOffset?: number;
}

/** How a child node serves its parent (QEMU's child roles). */
export type ChildRole = 'file' | 'backing' | 'filtered';

export interface ChildLink {
  role: ChildRole;
  node: import('./node.js').BlockNode;
}

export interface BlockDriver {
  /** Format or protocol name as users write it: 'raw', 'qcow2', 'memory', 'blkdebug'. */
  readonly formatName: string;
  /** Limits this driver needs; missing ones take the defaults in limits.ts. */
  readonly limits: Partial<BlockLimits>;
  readonly readOnly: boolean;

  /**
   * Writes past the end are allowed and grow the node (a protocol node under a
   * format driver that allocates clusters at the end of its file).
   */
  readonly growable?: boolean;
  /**
   * Formats that allocate: writes that may allocate, and every write-zeroes and
   * discard, are serialised with overlapping requests at this granularity.
   */
  readonly allocationAlignment?: number;
  /**
   * What a discarded range reads as afterwards: 'zero' (a punched host file),
   * 'unallocated' (it reads through to the backing node, zero without one).
   * Absent: undefined contents. The request layer decides from this whether a
   * discard can stand in for write-zeroes (io.discardLeavesZeroes).
   */
  readonly discardLeaves?: 'zero' | 'unallocated';
  /** Cheap, conservative: may a write to this range allocate (true when unsure)? */
  mayAllocate?(offset: number, bytes: number): boolean;

  /** Virtual size in bytes; a multiple of limits.requestAlignment. */
  size(): number;
  preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void>;
  pwritev?(offset: number, bytes: number, iov: Buffer[]): Promise<void>;
  pwriteZeroes?(offset: number, bytes: number, flags: ZeroFlags): Promise<void>;
  pdiscard?(offset: number, bytes: number): Promise<void>;
  blockStatus?(offset: number, bytes: number): Promise<DriverBlockStatus>;
  flush?(): Promise<void>;
  /** Change the size (protocol nodes: shrink or grow the host file). */
  truncate?(size: number): Promise<void>;
  /** Bytes of host storage the node really uses (st_blocks of the export). */
  allocatedBytes?(): Promise<number>;

  /**
   * Called once by the node that wraps this driver. The backing link lives on
   * the node (graph.ts changes it); a driver that reads through its backing
   * node reaches it here, never through a copy of its own.
   */
  attach?(node: import('./node.js').BlockNode): void;
  /** The nodes this driver reads or writes through, other than the backing node (a format's host file, a filter's child). */
  children?(): ChildLink[];
  /**
   * Record another backing file in the image (null: none). Only the image's
   * metadata changes; the graph's link is graph.ts's to change.
   */
  changeBackingFile?(name: string | null, format: string | null): Promise<void>;
  /** Switch between read-only and read-write (graph.ts reopen: a commit job writes into a backing node). */
  reopen?(readOnly: boolean): Promise<void>;
  /** Check the image's metadata (vdisk check), repairing what `repair` allows. */
  check?(repair: RepairMode): Promise<CheckResult>;
  /** A protocol that fetches over a network counts its requests (mount --stats, the API's imageStats). */
  readonly networkStats?: NetworkStats;
  close(): Promise<void>;
}

/** What a network protocol driver has asked for and got, since it was opened. */
export interface NetworkStats {
  requests: number;
  bytesFetched: number;
  retries: number;
}

/** What `vdisk check` may repair: nothing, leaked clusters, or everything it can. */
export type RepairMode = 'none' | 'leaks' | 'all';

/** A format's consistency check, in qemu-img check's terms. */
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
