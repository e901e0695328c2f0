/**
 * Creating qcow2 images: header (with backing file and format), refcount
 * table and blocks that describe every metadata cluster, and the L1 table; with
 * preallocation=metadata also every L2 table and data cluster (the file stays
 * sparse, so those read as zero).
 */
import fs from 'node:fs/promises';
import { VdiskError } from '../../errors.js';
import { COMPAT_LAZY_REFCOUNTS, EXT_VDISK_OPTIONS, INCOMPAT_EXTL2, VDISK_OPT_COPY_ON_READ, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, serializeHeader, type Qcow2Header } from './header.js';
import { writeL1Entry, writeL2Entry } from './l2-entry.js';
import { writeRefcount } from './refcount-entry.js';

export interface Qcow2CreateOptions {
  size: number;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  extendedL2?: boolean;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  preallocation?: 'off' | 'metadata';
  backingFile?: string;
  backingFormat?: string;
  /** Store "copy-on-read by default" in the image (a vdisk header extension). */
  copyOnRead?: boolean;
}

export function validateCreateOptions(o: Qcow2CreateOptions): Required<Omit<Qcow2CreateOptions, 'backingFile' | 'backingFormat' | 'copyOnRead'>> {
  const clusterSize = o.clusterSize ?? 65536;
  const bits = Math.log2(clusterSize);
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw new VdiskError('ERR_USAGE', `cluster_size must be a power of two from 512 to 2M, not ${clusterSize}`);
  }
  const compat = o.compat ?? '1.1';
  const refcountBits = o.refcountBits ?? 16;
  if (![1, 2, 4, 8, 16, 32, 64].includes(refcountBits)) throw new VdiskError('ERR_USAGE', `refcount_bits must be a power of two from 1 to 64, not ${refcountBits}`);
  const extendedL2 = o.extendedL2 ?? false;
  const lazyRefcounts = o.lazyRefcounts ?? false;
  if (compat === '0.10' && (extendedL2 || lazyRefcounts || refcountBits !== 16)) {
    throw new VdiskError('ERR_USAGE', 'compat=0.10 images have no extended_l2, no lazy_refcounts and 16-bit refcounts only');
  }
  if (extendedL2 && clusterSize < 16384) throw new VdiskError('ERR_USAGE', 'extended_l2 needs a cluster_size of at least 16k');
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw new VdiskError('ERR_USAGE', `bad size ${o.size}`);
  if (o.size % 512) throw new VdiskError('ERR_USAGE', `the size of a qcow2 image must be a multiple of 512 bytes (${o.size})`);
  const preallocation = o.preallocation ?? 'off';
  return { size: o.size, clusterSize, compat, extendedL2, refcountBits, lazyRefcounts, preallocation };
}

export async function createQcow2(path: string, options: Qcow2CreateOptions, overwrite: boolean): Promise<void> {
  const o = validateCreateOptions(options);
  const cs = o.clusterSize;
  const clusterBits = Math.log2(cs);
  const l2Entries = cs / (o.extendedL2 ? 16 : 8);
  const dataClusters = Math.ceil(o.size / cs);
  const l1Size = Math.ceil(dataClusters / l2Entries);
  if (l1Size * 8 > MAX_L1_BYTES) throw new VdiskError('ERR_USAGE', `a ${o.size}-byte disk needs an L1 table over ${MAX_L1_BYTES / 1024 / 1024} MiB: use a larger cluster_size`);
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const prealloc = o.preallocation === 'metadata';
  const fixed = 1 + l1Clusters + (prealloc ? l1Size + dataClusters : 0);
  const refcountOrder = Math.log2(o.refcountBits);
  const entriesPerBlock = (cs * 8) / o.refcountBits;
  // Refcount table and blocks must also describe themselves: iterate to a fixed point.
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = fixed + tableClusters + blocks;
    const b = Math.ceil(total / entriesPerBlock);
    const t = Math.max(1, Math.ceil((b * 8) / cs));
    if (b === blocks && t === tableClusters) break;
    blocks = b;
    tableClusters = t;
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new VdiskError('ERR_USAGE', `the refcount table would exceed ${MAX_REFTABLE_BYTES / 1024 / 1024} MiB: use a larger cluster_size or fewer refcount bits`);
  // Layout: header | refcount table | refcount blocks | L1 | (L2 tables | data clusters)
  const reftableAt = 1;
  const blocksAt = reftableAt + tableClusters;
  const l1At = blocksAt + blocks;
  const l2At = l1At + l1Clusters;
  const dataAt = l2At + l1Size;
  const total = l1At + l1Clusters + (prealloc ? l1Size + dataClusters : 0);

  const header: Qcow2Header = {
    version: o.compat === '0.10' ? 2 : 3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: o.size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1At * cs,
    refcountTableOffset: reftableAt * cs,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: o.extendedL2 ? INCOMPAT_EXTL2 : 0n,
    compatibleFeatures: o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    headerLength: o.compat === '0.10' ? 72 : 112,
    compressionType: 0,
    unknownHeaderTail: Buffer.alloc(7),
    extensions: options.copyOnRead ? [{ type: EXT_VDISK_OPTIONS, data: Buffer.from([VDISK_OPT_COPY_ON_READ]) }] : [],
    backingFile: options.backingFile ?? null,
    backingFormat: options.backingFile ? (options.backingFormat ?? null) : null,
  };
  const head = serializeHeader(header);

  const reftable = Buffer.alloc(tableClusters * cs);
  for (let b = 0; b < blocks; b++) reftable.writeBigUInt64BE(BigInt((blocksAt + b) * cs), b * 8);
  /** Refcount block `b`: refcount 1 for every cluster the image uses. */
  const fillBlock = (block: Buffer, b: number) => {
    for (let c = b * entriesPerBlock; c < Math.min(total, (b + 1) * entriesPerBlock); c++) {
      writeRefcount(block, c % entriesPerBlock, o.refcountBits, 1);
    }
  };
  const l1 = Buffer.alloc(l1Clusters * cs);
  if (prealloc) for (let i = 0; i < l1Size; i++) writeL1Entry(l1, i, (l2At + i) * cs, true);
  /** L2 table `i`: every guest cluster it covers mapped to its preallocated data cluster. */
  const fillL2 = (l2: Buffer, i: number) => {
    for (let j = 0; j < l2Entries; j++) {
      const guest = i * l2Entries + j;
      if (guest >= dataClusters) break;
      writeL2Entry(l2, j, o.extendedL2, { host: (dataAt + guest) * cs, copied: true, allocMask: 0xffffffff, zeroMask: 0 });
    }
  };

  let fh: fs.FileHandle;
  try {
    fh = await fs.open(path, overwrite ? 'w' : 'wx');
  } catch (err) {
    if ((err as { code?: string }).code === 'EEXIST') throw new VdiskError('EEXIST', `${path} exists (use --force to replace it)`);
    throw err;
  }
  try {
    await fh.write(head, 0, head.length, 0);
    await fh.write(reftable, 0, reftable.length, reftableAt * cs);
    await writeTables(fh, cs, blocksAt, blocks, fillBlock);
    await fh.write(l1, 0, l1.length, l1At * cs);
    if (prealloc) await writeTables(fh, cs, l2At, l1Size, fillL2);
    await fh.truncate(total * cs);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Bytes of tables built and written at a time: memory stays this small whatever the disk size. */
const TABLE_BATCH_BYTES = 4 * 1024 * 1024;

/** Write `count` consecutive cluster-sized tables from cluster `at` on, built by `fill`, in bounded batches. */
async function writeTables(fh: fs.FileHandle, cs: number, at: number, count: number, fill: (table: Buffer, index: number) => void): Promise<void> {
  const perBatch = Math.max(1, Math.floor(TABLE_BATCH_BYTES / cs));
  const batch = Buffer.alloc(Math.min(count, perBatch) * cs);
  for (let first = 0; first < count; first += perBatch) {
    const n = Math.min(perBatch, count - first);
    batch.fill(0);
    for (let k = 0; k < n; k++) fill(batch.subarray(k * cs, (k + 1) * cs), first + k);
    await fh.write(batch, 0, n * cs, (at + first) * cs);
  }
}
