import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { blockStatus, blockStatusAbove } from '../../src/block/block-status.js';
import { MemoryDriver } from '../../src/drivers/memory.js';

const CHUNK = 64 * 1024;

describe('block status above a chain', () => {
  it('answers from the first node that defines a range, and zero past a shorter backing', async () => {
    const base = new BlockNode(new MemoryDriver({ size: 4 * CHUNK }), { name: 'base' });
    const mid = new BlockNode(new MemoryDriver({ size: 6 * CHUNK, unwrittenIsUnallocated: true }), { name: 'mid', backing: base });
    const top = new BlockNode(new MemoryDriver({ size: 8 * CHUNK, unwrittenIsUnallocated: true }), { name: 'top', backing: mid });
    await io.pwritev(base, 0, CHUNK, [Buffer.alloc(CHUNK, 1)]);
    await io.pwritev(mid, 2 * CHUNK, CHUNK, [Buffer.alloc(CHUNK, 2)]);
    await io.pwritev(top, 5 * CHUNK, CHUNK, [Buffer.alloc(CHUNK, 3)]);

    const st0 = await blockStatusAbove(top, 0, 8 * CHUNK);
    expect(st0).toMatchObject({ bytes: CHUNK, allocated: true, data: true, zero: false });
    expect(st0.node).toBe(base);
    const st1 = await blockStatusAbove(top, CHUNK, 7 * CHUNK);
    expect(st1).toMatchObject({ bytes: CHUNK, allocated: true, zero: true });
    expect(st1.node).toBe(base);
    const st2 = await blockStatusAbove(top, 2 * CHUNK, 6 * CHUNK);
    expect(st2.node).toBe(mid);
    expect(st2.data).toBe(true);
    // 4..5: past the end of base, unallocated in mid and top: reads zero, nobody defines it.
    const st4 = await blockStatusAbove(top, 4 * CHUNK, 4 * CHUNK);
    expect(st4).toMatchObject({ allocated: false, zero: true, node: null, bytes: CHUNK });
    const st5 = await blockStatusAbove(top, 5 * CHUNK + 100, 100);
    expect(st5).toMatchObject({ bytes: 100, data: true });
    expect(st5.node).toBe(top);
    // Above `base` only: base's data does not count.
    const stBase = await blockStatusAbove(top, 0, CHUNK, base);
    expect(stBase).toMatchObject({ allocated: false, node: null });
  });

  it('rejects offsets outside the node', async () => {
    const node = new BlockNode(new MemoryDriver({ size: CHUNK }));
    await expect(blockStatus(node, CHUNK, 1)).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
