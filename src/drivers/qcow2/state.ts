/**
 * One open qcow2 image's shared state (QEMU's BDRVQcow2State): header and
 * geometry, the L1 table, the L2 and refcount caches, where metadata lives,
 * whether the image was found corrupt, and the lock that serialises metadata
 * changes. The cluster map, reads, allocation, zeroing, flush and check all
 * work on this; the driver (index.ts) only wires them to the BlockDriver interface.
 */
import type { BlockNode } from '../../block/node.js';
import * as io from '../../block/io.js';
import { VdiskError } from '../../errors.js';
import { tracer } from '../../trace.js';
import { INCOMPAT_CORRUPT, INCOMPAT_EXTL2, serializeHeader, type Qcow2Header } from './header.js';
import type { Refcounts } from './refcount.js';
import type { TableCache } from './table-cache.js';
import { Mutex } from './mutex.js';
import { MetadataRanges } from './metadata-ranges.js';

const trace = tracer('qcow2');

export class Qcow2State {
  readonly file: BlockNode;
  readonly header: Qcow2Header;
  readonly warnings: string[] = [];
  /** The node the driver serves (Qcow2Driver.attach): the backing link is its, graph.ts changes it. */
  node: BlockNode | null = null;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  /** A subcluster with extended L2 entries, else the whole cluster. */
  readonly subclusterSize: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  ro: boolean;
  /** A reopen to read-only is under way: new writes are refused while it flushes (reopen.ts). */
  writesStopped = false;
  readonly l1: Buffer;
  /** The in-memory L1 differs from the file: written at the next flush. */
  l1Dirty = false;
  readonly l2Cache: TableCache;
  readonly refcounts: Refcounts;
  readonly metaLock = new Mutex();
  /** Where metadata lives: data writes, allocations and tables placed there would destroy the image. */
  metadataRanges: MetadataRanges;
  /** Why the image was found corrupt while open (writes are refused from then on), or null. */
  corruptReason: string | null = null;
  corruptBitWrite: Promise<void> | null = null;
  /** Opened read-only only because of the corrupt bit, though writable was asked: a repair may write. */
  corruptBitOnly = false;
  /** The last compressed cluster decoded: sequential reads decode each cluster once. */
  lastDecompressed: { host: number; data: Buffer } | null = null;

  /** The backing node, as the graph links it (one link, on the node). */
  get backing(): BlockNode | null {
    return this.node?.backing ?? null;
  }

  constructor(file: BlockNode, header: Qcow2Header, l1: Buffer, refcounts: Refcounts, l2Cache: TableCache, readOnly: boolean) {
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
    this.metadataRanges = new MetadataRanges(this.clusterSize);
  }

  /** The guest disk size. */
  size(): number {
    return this.header.size;
  }

  /**
   * Metadata overlap found: as QEMU does, mark the image corrupt (incompatible
   * bit 1, when writable) and refuse every write from now on, so that nothing
   * more is written through tables that alias each other. Returns the error to throw.
   */
  corruption(message: string): VdiskError {
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

  checkWritable(): void {
    if (this.ro || this.writesStopped) throw new VdiskError('EROFS', 'qcow2 image opened read-only');
    if (this.corruptReason) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: the image is corrupt (${this.corruptReason}): writes are refused`);
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

  /** Rewrite the header cluster's metadata area (extensions preserved), then flush. */
  async writeHeader(): Promise<void> {
    const buf = serializeHeader(this.header);
    await io.pwritev(this.file, 0, buf.length, [buf]);
    await io.flush(this.file);
  }
}
