import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { BlkdebugDriver } from '../../src/drivers/blkdebug.js';
import { MemoryDriver } from '../../src/drivers/memory.js';

function stack(rules: ConstructorParameters<typeof BlkdebugDriver>[1]) {
  const child = new BlockNode(new MemoryDriver({ size: 1024 * 1024, limits: { requestAlignment: 4096 } }));
  const dbg = new BlkdebugDriver(child, rules);
  return { node: new BlockNode(dbg), dbg, child };
}

describe('blkdebug fault injection', () => {
  it('fails reads in the chosen range only, with the chosen code', async () => {
    const { node, dbg } = stack([{ op: 'read', offset: 65536, bytes: 4096, error: 'EIO' }]);
    await io.preadv(node, 0, 4096, [Buffer.alloc(4096)]);
    await expect(io.preadv(node, 60000, 8192, [Buffer.alloc(8192)])).rejects.toMatchObject({ code: 'EIO' });
    expect(dbg.hits[0]).toBe(1);
  });

  it('a failed read-modify-write read fails the write and changes nothing', async () => {
    const { node, child } = stack([{ op: 'read', offset: 8192, bytes: 4096, error: 'EIO', count: 1 }]);
    await io.pwritev(child, 8192, 4096, [Buffer.alloc(4096, 9)]);
    await expect(io.pwritev(node, 8200, 10, [Buffer.alloc(10, 1)])).rejects.toMatchObject({ code: 'EIO' });
    const back = Buffer.alloc(4096);
    await io.preadv(node, 8192, 4096, [back]);
    expect(back.every((b) => b === 9)).toBe(true);
  });

  it('ENOSPC on write and a failing flush propagate', async () => {
    const { node } = stack([
      { op: 'write', error: 'ENOSPC' },
      { op: 'flush', error: 'EIO' },
    ]);
    await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 1)])).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(io.flush(node)).rejects.toMatchObject({ code: 'EIO' });
  });

  it('a delayed write still serialises an overlapping read-modify-write behind it', async () => {
    const { node } = stack([{ op: 'write', offset: 0, bytes: 4096, delayMs: 30, count: 1 }]);
    const first = io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 1)]);
    const second = io.pwritev(node, 10, 10, [Buffer.alloc(10, 2)]);
    await Promise.all([first, second]);
    const back = Buffer.alloc(4096);
    await io.preadv(node, 0, 4096, [back]);
    const expected = Buffer.alloc(4096, 1);
    expected.fill(2, 10, 20);
    expect(back.equals(expected)).toBe(true);
  });
});
