import type { BlockDriver, BlockLimits } from './driver.js';
import { VdiskError } from '../errors.js';

export const DEFAULT_MAX_TRANSFER_BYTES = 16 * 1024 * 1024;
/** Largest zero buffer the write-zeroes fallback ever allocates (QEMU's MAX_BOUNCE_BUFFER idea). */
export const MAX_ZERO_BOUNCE_BYTES = 1024 * 1024;

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** The driver's limits with defaults filled in, checked once at open. */
export function resolveLimits(driver: BlockDriver): BlockLimits {
  const l = driver.limits;
  const requestAlignment = l.requestAlignment ?? 1;
  const limits: BlockLimits = {
    requestAlignment,
    maxTransfer: l.maxTransfer ?? DEFAULT_MAX_TRANSFER_BYTES,
    pwriteZeroesAlignment: l.pwriteZeroesAlignment ?? requestAlignment,
    maxPwriteZeroes: l.maxPwriteZeroes ?? 2 ** 52,
    pdiscardAlignment: l.pdiscardAlignment ?? requestAlignment,
    maxPdiscard: l.maxPdiscard ?? 2 ** 52,
  };
  for (const key of ['requestAlignment', 'pwriteZeroesAlignment', 'pdiscardAlignment'] as const) {
    if (!isPowerOfTwo(limits[key])) throw new VdiskError('EINVAL', `${driver.formatName}: ${key} must be a power of two`);
  }
  for (const key of ['maxTransfer', 'maxPwriteZeroes', 'maxPdiscard'] as const) {
    // Keep the maxima aligned so that splitting never produces an unaligned piece.
    limits[key] = Math.floor(limits[key] / requestAlignment) * requestAlignment;
    if (limits[key] <= 0) throw new VdiskError('EINVAL', `${driver.formatName}: ${key} is smaller than requestAlignment`);
  }
  return limits;
}
