/**
 * Errors the block layer raises carry a code from the error table
 * (src/errors.ts), and an out-of-range request has one code wherever it is
 * caught: EINVAL (a request past the end is the caller's mistake, not a failing device).
 */
import { describe, expect, it } from 'vitest';
import { blockStatus } from '../../src/block/block-status.js';
import * as io from '../../src/block/io.js';
import { BlockNode } from '../../src/block/node.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { VdiskError } from '../../src/errors.js';

describe('block-layer error codes', () => {
  it('a size that is not a multiple of the request alignment is EINVAL', () => {
    const drv = new MemoryDriver({ size: 1000, limits: { requestAlignment: 512 } });
    expect(() => new BlockNode(drv)).toThrow(VdiskError);
    expect(() => new BlockNode(drv)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  });

  it('limits a driver declares wrongly are EINVAL', () => {
    expect(() => new BlockNode(new MemoryDriver({ size: 3 * 4096, limits: { requestAlignment: 3 } }))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => new BlockNode(new MemoryDriver({ size: 8192, limits: { requestAlignment: 4096, maxTransfer: 100 } }))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
  });

  it('a request past the end is EINVAL for reads, writes, write-zeroes and block status alike', async () => {
    const node = new BlockNode(new MemoryDriver({ size: 8192 }));
    await expect(io.preadv(node, 8000, 200, [Buffer.alloc(200)])).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(io.pwritev(node, 8192, 1, [Buffer.alloc(1)])).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(io.pwriteZeroes(node, 4096, 8192)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(blockStatus(node, 8192, 512)).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
