/**
 * The qcow2 header and its extensions (docs/interop/qcow2.txt in QEMU):
 * parsing with every size read from the file bounded before it is used, and
 * serialising back with unknown extensions preserved byte for byte.
 */
import { VdiskError } from '../../errors.js';

export const QCOW2_MAGIC = 0x514649fb;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/**
 * vdisk's own extension: options stored in the image. qemu ignores and keeps
 * unknown extensions, so `qemu-img check` still accepts the image.
 * Data: one byte of flags (bit 0: copy-on-read by default).
 */
export const EXT_VDISK_OPTIONS = 0x7664736b; // "vdsk"
export const VDISK_OPT_COPY_ON_READ = 0x01;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits, which keep tables from untrusted headers to a sane size. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME_BYTES = 1023;
/** 2^56: L1/L2 entries cannot address host offsets beyond this. */
export const MAX_HOST_OFFSET = 2 ** 56;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes between 105 and headerLength that this version does not know: kept as is. */
  unknownHeaderTail: Buffer;
  extensions: HeaderExtension[];
  backingFile: string | null;
  backingFormat: string | null;
}

function corrupt(message: string): VdiskError {
  return new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: ${message}`);
}

function u64(buf: Buffer, offset: number, what: string): number {
  const v = buf.readBigUInt64BE(offset);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} ${v} is absurd`);
  return Number(v);
}

/**
 * Parse the header from the start of the image: the caller passes the first
 * min(file size, 2 MiB) bytes, which hold the whole first cluster at any
 * cluster size (header extensions and the backing name live there).
 * `fileSize` bounds every offset.
 */
export function parseHeader(buf: Buffer, fileSize: number): Qcow2Header {
  if (buf.length < 72) throw corrupt(`file too short for a header (${buf.length} bytes)`);
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw new VdiskError('ERR_IMAGE_FORMAT', 'not a qcow2 image (bad magic)');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new VdiskError('ERR_IMAGE_FORMAT', `qcow2 version ${version} is not supported (2 or 3)`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) throw corrupt(`cluster_bits ${clusterBits} outside 9..21`);
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(buf, 8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: u64(buf, 24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(buf, 40, 'l1_table_offset'),
    refcountTableOffset: u64(buf, 48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    unknownHeaderTail: Buffer.alloc(0),
    extensions: [],
    backingFile: null,
    backingFormat: null,
  };
  if (version === 3) {
    if (buf.length < 104) throw corrupt('file too short for a version 3 header');
    h.incompatibleFeatures = buf.readBigUInt64BE(72);
    h.compatibleFeatures = buf.readBigUInt64BE(80);
    h.autoclearFeatures = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > Math.min(clusterSize, buf.length)) {
      throw corrupt(`header_length ${h.headerLength} is invalid`);
    }
    if (h.headerLength > 104) h.compressionType = buf[104]!;
    if (h.headerLength > 105) h.unknownHeaderTail = Buffer.from(buf.subarray(105, h.headerLength));
  }
  if (h.refcountOrder > 6) throw corrupt(`refcount_order ${h.refcountOrder} is larger than 6`);
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown) throw new VdiskError('ERR_IMAGE_FORMAT', `qcow2: unknown incompatible features 0x${unknown.toString(16)}`);
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) && clusterBits < 14) throw corrupt('extended L2 entries need clusters of at least 16 KiB');
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION ? h.compressionType === 0 : h.compressionType !== 0) {
    throw corrupt(`compression_type ${h.compressionType} does not match the compression type feature bit`);
  }
  if (h.compressionType > 1) throw new VdiskError('ERR_IMAGE_FORMAT', `qcow2: unknown compression type ${h.compressionType}`);
  if (h.size % 512 !== 0) throw corrupt(`virtual size ${h.size} is not a multiple of 512`);

  // Tables: aligned, inside the file, of bounded size.
  const alignedIn = (off: number, bytes: number, what: string) => {
    if (off % clusterSize !== 0) throw corrupt(`${what} offset ${off} is not cluster aligned`);
    if (off + bytes > fileSize || off + bytes > MAX_HOST_OFFSET) throw corrupt(`${what} [${off}, +${bytes}) lies outside the file (${fileSize} bytes)`);
    if (off === 0 && bytes > 0) throw corrupt(`${what} overlaps the header`);
  };
  const l2Entries = clusterSize / ((h.incompatibleFeatures & INCOMPAT_EXTL2) ? 16 : 8);
  const neededL1 = Math.ceil(h.size / clusterSize / l2Entries);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw corrupt(`L1 table of ${h.l1Size} entries is too large`);
  if (h.l1Size < neededL1) throw corrupt(`L1 table of ${h.l1Size} entries cannot map ${h.size} bytes`);
  alignedIn(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  if (h.refcountTableClusters === 0) throw corrupt('the refcount table is empty');
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) throw corrupt(`refcount table of ${h.refcountTableClusters} clusters is too large`);
  alignedIn(h.refcountTableOffset, h.refcountTableClusters * clusterSize, 'refcount table');
  if (h.nbSnapshots > 65536) throw corrupt(`${h.nbSnapshots} snapshots is absurd`);
  if (h.nbSnapshots > 0) alignedIn(h.snapshotsOffset, 40 * h.nbSnapshots, 'snapshot table');

  // Extensions, between the header and the end of the first cluster.
  const extEnd = Math.min(clusterSize, buf.length);
  let pos = h.headerLength;
  for (;;) {
    if (pos + 8 > extEnd) break; // no end marker: tolerated, as qemu does
    const type = buf.readUInt32BE(pos);
    const len = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    if (pos + 8 + len > extEnd) throw corrupt(`header extension 0x${type.toString(16)} runs past the first cluster`);
    const data = Buffer.from(buf.subarray(pos + 8, pos + 8 + len));
    if (type === EXT_BACKING_FORMAT) {
      if (len > 255) throw corrupt('backing format name is too long');
      h.backingFormat = data.toString('utf8');
    }
    h.extensions.push({ type, data });
    pos += 8 + Math.ceil(len / 8) * 8;
  }

  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > MAX_BACKING_NAME_BYTES) throw corrupt(`backing file name of ${h.backingFileSize} bytes`);
    if (h.backingFileOffset + h.backingFileSize > extEnd) throw corrupt('backing file name lies outside the first cluster');
    h.backingFile = buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('utf8');
  }
  return h;
}

/** Bytes of the header itself (72 for v2, headerLength for v3). */
function headerBytes(h: Qcow2Header): number {
  return h.version === 2 ? 72 : h.headerLength;
}

/**
 * The first cluster's metadata area: header, extensions (backing format first,
 * unknown ones preserved), end marker, then the backing file name. Throws if it
 * does not fit in one cluster.
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const exts = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT);
  if (h.backingFormat !== null && h.backingFile !== null) exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(h.backingFormat) });
  let bytes = headerBytes(h);
  for (const e of exts) bytes += 8 + Math.ceil(e.data.length / 8) * 8;
  bytes += 8; // end marker
  const name = h.backingFile === null ? Buffer.alloc(0) : Buffer.from(h.backingFile);
  if (name.length > MAX_BACKING_NAME_BYTES) throw new VdiskError('EINVAL', `backing file name longer than ${MAX_BACKING_NAME_BYTES} bytes`);
  const total = bytes + name.length;
  if (total > clusterSize) throw new VdiskError('EINVAL', `qcow2 header and extensions (${total} bytes) do not fit in one ${clusterSize}-byte cluster`);
  const buf = Buffer.alloc(total);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  buf.writeBigUInt64BE(BigInt(name.length ? bytes : 0), 8);
  buf.writeUInt32BE(name.length, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(h.size), 24);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  buf.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  buf.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  buf.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version === 3) {
    buf.writeBigUInt64BE(h.incompatibleFeatures, 72);
    buf.writeBigUInt64BE(h.compatibleFeatures, 80);
    buf.writeBigUInt64BE(h.autoclearFeatures, 88);
    buf.writeUInt32BE(h.refcountOrder, 96);
    buf.writeUInt32BE(h.headerLength, 100);
    if (h.headerLength > 104) buf[104] = h.compressionType;
    h.unknownHeaderTail.copy(buf, 105, 0, Math.max(0, h.headerLength - 105));
  }
  let pos = headerBytes(h);
  for (const e of exts) {
    buf.writeUInt32BE(e.type, pos);
    buf.writeUInt32BE(e.data.length, pos + 4);
    e.data.copy(buf, pos + 8);
    pos += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  pos += 8; // end marker: zeroes
  name.copy(buf, pos);
  if (name.length) h.backingFileOffset = pos;
  h.backingFileSize = name.length;
  return buf;
}

export function featureNames(h: Qcow2Header): string[] {
  const names: string[] = [];
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) names.push('dirty');
  if (h.incompatibleFeatures & INCOMPAT_CORRUPT) names.push('corrupt');
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) names.push('external-data-file');
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) names.push('compression-type');
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) names.push('extended-l2');
  if (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) names.push('lazy-refcounts');
  if (h.autoclearFeatures & AUTOCLEAR_BITMAPS) names.push('bitmaps');
  if (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) names.push('data-file-raw');
  return names;
}
