/**
 * Reads: guest ranges split into pieces of one kind (cluster-map.ts); host-
 * contiguous data is read in one go, zero clusters fill, unallocated ranges
 * read through the backing node, compressed clusters (zlib or zstd) decode.
 */
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import { Decompress } from 'fzstd';
import * as io from '../../block/io.js';
import { iovCopyFrom, iovSlice } from '../../block/iov.js';
import { VdiskError } from '../../errors.js';
import { MAX_CLUSTER_BITS } from './header.js';
import type { L2Entry } from './l2-entry.js';
import { piece, type Piece } from './cluster-map.js';
import type { Qcow2State } from './state.js';

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
const MAX_ZSTD_WINDOW = 2 ** MAX_CLUSTER_BITS;

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

export async function preadv(s: Qcow2State, offset: number, bytes: number, iov: Buffer[]): Promise<void> {
  for (let done = 0; done < bytes; ) {
    const p = await piece(s, offset + done, bytes - done);
    // Coalesce host-contiguous normal pieces into one file read.
    let n = p.bytes;
    while (p.kind === 'normal' && done + n < bytes) {
      const q = await piece(s, offset + done + n, bytes - done - n);
      if (q.kind !== 'normal' || q.host !== p.host + n) break;
      n += q.bytes;
    }
    await readPiece(s, { ...p, bytes: n }, offset + done, iovSlice(iov, done, n));
    done += n;
  }
}

async function readPiece(s: Qcow2State, p: Piece, guestOffset: number, dst: Buffer[]): Promise<void> {
  switch (p.kind) {
    case 'normal':
      return io.preadv(s.file, p.host, p.bytes, dst);
    case 'zero':
      for (const b of dst) b.fill(0);
      return;
    case 'unallocated':
      return readBacking(s, guestOffset, p.bytes, dst);
    case 'compressed': {
      iovCopyFrom(dst, await decompress(s, p.entry), guestOffset % s.clusterSize);
    }
  }
}

/** Read from the backing node (the request layer zeroes what lies past its end). */
export function readBacking(s: Qcow2State, offset: number, bytes: number, dst: Buffer[]): Promise<void> {
  return io.readBacking(s.backing, offset, bytes, dst);
}

async function decompress(s: Qcow2State, e: L2Entry): Promise<Buffer> {
  if (s.lastDecompressed?.host === e.compressedOffset) return s.lastDecompressed.data;
  const fileEnd = s.file.size();
  const n = Math.max(0, Math.min(e.compressedBytes, fileEnd - e.compressedOffset));
  const raw = Buffer.alloc(n);
  if (n) await io.preadv(s.file, e.compressedOffset, n, [raw]);
  let data: Buffer;
  try {
    data = s.header.compressionType === 1 ? zstdCluster(raw, s.clusterSize) : inflateRawSync(raw, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: s.clusterSize });
  } catch (err) {
    throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster at ${e.compressedOffset} does not decompress: ${(err as Error).message}`, { cause: err });
  }
  if (data.length !== s.clusterSize) {
    throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: compressed cluster at ${e.compressedOffset} inflates to ${data.length} bytes, not ${s.clusterSize}`);
  }
  s.lastDecompressed = { host: e.compressedOffset, data };
  return data;
}
