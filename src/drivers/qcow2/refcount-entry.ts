/**
 * Refcount block entry encoding: `bits` (1 to 64, a power of two) per entry,
 * big-endian; entries under a byte are packed least significant bits first.
 */
import { VdiskError } from '../../errors.js';

export function readRefcount(block: Buffer, i: number, bits: number): number {
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const bit = i * bits;
      return (block[bit >> 3]! >> (bit & 7)) & (2 ** bits - 1);
    }
    case 8:
      return block[i]!;
    case 16:
      return block.readUInt16BE(i * 2);
    case 32:
      return block.readUInt32BE(i * 4);
    default: {
      const v = block.readBigUInt64BE(i * 8);
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new VdiskError('ERR_IMAGE_CORRUPT', `qcow2: refcount ${v} is absurd`);
      return Number(v);
    }
  }
}

export function writeRefcount(block: Buffer, i: number, bits: number, value: number): void {
  switch (bits) {
    case 1:
    case 2:
    case 4: {
      const bit = i * bits;
      const mask = (2 ** bits - 1) << (bit & 7);
      block[bit >> 3] = (block[bit >> 3]! & ~mask) | ((value << (bit & 7)) & mask);
      return;
    }
    case 8:
      block[i] = value;
      return;
    case 16:
      block.writeUInt16BE(value, i * 2);
      return;
    case 32:
      block.writeUInt32BE(value, i * 4);
      return;
    default:
      block.writeBigUInt64BE(BigInt(value), i * 8);
  }
}
