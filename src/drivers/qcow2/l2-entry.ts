/**
 * L1/L2 entry encoding. Entries are 64-bit big-endian words read as two
 * 32-bit halves so that offsets stay plain numbers (host offsets are below
 * 2^56); only the compressed descriptor, which packs 62 bits, uses BigInt.
 * Extended L2 entries add a 64-bit subcluster bitmap: bits 0-31 "allocated",
 * bits 32-63 "reads as zero".
 */
import { VdiskError } from '../../errors.js';

const COPIED = 0x80000000;
const COMPRESSED = 0x40000000;
const OFFSET_HI_MASK = 0x00ffffff;
const ZERO_FLAG = 1;

export type ClusterKind = 'unallocated' | 'zero' | 'normal' | 'compressed';

export interface L2Entry {
  /** Host cluster offset for normal (and preallocated zero) clusters; 0 if none. */
  host: number;
  copied: boolean;
  compressed: boolean;
  /** v3 standard entries: the whole cluster reads as zero. */
  zeroFlag: boolean;
  /** Extended L2 only: subcluster bitmaps. */
  allocMask: number;
  zeroMask: number;
  /** Compressed clusters: where the compressed bytes are and how many may be read. */
  compressedOffset: number;
  compressedBytes: number;
}

export function readL1Entry(l1: Buffer, index: number): { offset: number; copied: boolean } {
  const hi = l1.readUInt32BE(index * 8);
  const lo = l1.readUInt32BE(index * 8 + 4);
  return { offset: (hi & OFFSET_HI_MASK) * 2 ** 32 + ((lo & ~0x1ff) >>> 0), copied: (hi & COPIED) !== 0 };
}

export function writeL1Entry(l1: Buffer, index: number, offset: number, copied: boolean): void {
  l1.writeUInt32BE(((copied ? COPIED : 0) | Math.floor(offset / 2 ** 32)) >>> 0, index * 8);
  l1.writeUInt32BE(offset % 2 ** 32, index * 8 + 4);
}

export function readL2Entry(table: Buffer, index: number, extended: boolean, clusterBits: number): L2Entry {
  const pos = index * (extended ? 16 : 8);
  const hi = table.readUInt32BE(pos);
  const lo = table.readUInt32BE(pos + 4);
  const e: L2Entry = {
    host: 0,
    copied: (hi & COPIED) !== 0,
    compressed: (hi & COMPRESSED) !== 0,
    zeroFlag: false,
    allocMask: 0,
    zeroMask: 0,
    compressedOffset: 0,
    compressedBytes: 0,
  };
  if (e.compressed) {
    // x = 62 - (cluster_bits - 8) low bits of offset, then the count of extra 512-byte sectors.
    const x = BigInt(62 - (clusterBits - 8));
    const v = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
    const offset = Number(v & ((1n << x) - 1n));
    const sectors = Number(v >> x) + 1;
    e.compressedOffset = offset;
    e.compressedBytes = sectors * 512 - (offset % 512);
    return e;
  }
  e.host = (hi & OFFSET_HI_MASK) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
  if (extended) {
    e.allocMask = table.readUInt32BE(pos + 12);
    e.zeroMask = table.readUInt32BE(pos + 8);
  } else {
    e.zeroFlag = (lo & ZERO_FLAG) !== 0;
  }
  return e;
}

/** Write a standard (non-compressed) entry. */
export function writeL2Entry(
  table: Buffer,
  index: number,
  extended: boolean,
  entry: { host: number; copied: boolean; zeroFlag?: boolean; allocMask?: number; zeroMask?: number },
): void {
  const pos = index * (extended ? 16 : 8);
  table.writeUInt32BE(((entry.copied ? COPIED : 0) | Math.floor(entry.host / 2 ** 32)) >>> 0, pos);
  table.writeUInt32BE(((entry.host % 2 ** 32) | (!extended && entry.zeroFlag ? ZERO_FLAG : 0)) >>> 0, pos + 4);
  if (extended) {
    table.writeUInt32BE((entry.zeroMask ?? 0) >>> 0, pos + 8);
    table.writeUInt32BE((entry.allocMask ?? 0) >>> 0, pos + 12);
  }
}

/** Set or clear an L2 entry's COPIED flag, leaving every other bit as it is (repair). */
export function setL2Copied(table: Buffer, index: number, extended: boolean, copied: boolean): void {
  const pos = index * (extended ? 16 : 8);
  const hi = table.readUInt32BE(pos);
  table.writeUInt32BE((copied ? hi | COPIED : hi & ~COPIED) >>> 0, pos);
}

/** Kind of subcluster `sc` (always 0 without extended L2) of an entry. */
export function subclusterKind(e: L2Entry, sc: number, extended: boolean): ClusterKind {
  if (e.compressed) return 'compressed';
  if (!extended) {
    if (e.zeroFlag) return 'zero';
    return e.host ? 'normal' : 'unallocated';
  }
  const bit = 2 ** sc;
  if (e.allocMask & bit) {
    if (!e.host) throw new VdiskError('ERR_IMAGE_CORRUPT', 'qcow2: allocated subcluster without a host cluster');
    return 'normal';
  }
  return e.zeroMask & bit ? 'zero' : 'unallocated';
}
