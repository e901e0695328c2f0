/** Discard in the request layer: the driver's discardLeaves capability, and a discard that must leave zeroes. */
import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { notSupported } from '../../src/errors.js';

const MiB = 1024 * 1024;

describe('discard', () => {
  it('leaves zeroes only where the driver says so: zero, or unallocated with nothing below', () => {
    const zeroing = new BlockNode(new MemoryDriver({ size: MiB }));
    expect(io.discardLeavesZeroes(zeroing)).toBe(true);
    expect(io.discardLeavesZeroes(new BlockNode(new MemoryDriver({ size: MiB }), { discard: 'ignore' }))).toBe(false);
    expect(io.discardLeavesZeroes(new BlockNode(new MemoryDriver({ size: MiB, readOnly: true })))).toBe(false);
    const unallocating = new MemoryDriver({ size: MiB, unwrittenIsUnallocated: true });
    expect(io.discardLeavesZeroes(new BlockNode(unallocating))).toBe(true);
    expect(io.discardLeavesZeroes(new BlockNode(unallocating, { backing: zeroing }))).toBe(false);
  });

  it('mustZero: whole units are discarded, the partial edges zeroed, and what the driver declines is zeroed too', async () => {
    class DecliningDiscard extends MemoryDriver {
      declineFrom = Infinity;
      override async pdiscard(offset: number, bytes: number): Promise<void> {
        if (offset >= this.declineFrom) throw notSupported('discard here');
        return super.pdiscard(offset, bytes);
      }
    }
    const unit = 65536;
    const driver = new DecliningDiscard({ size: MiB, nativeZeroes: true, limits: { requestAlignment: 512, pdiscardAlignment: unit, maxPdiscard: unit } });
    driver.recordCalls = true;
    const node = new BlockNode(driver);
    await io.pwritev(node, 0, MiB, [Buffer.alloc(MiB, 0xaa)]);
    driver.calls.length = 0;
    driver.declineFrom = 3 * unit;
    await io.pdiscard(node, unit - 512, 4 * unit, { mustZero: true });
    expect(driver.calls.filter((c) => c.op !== 'read')).toEqual([
      { op: 'zero', offset: unit - 512, bytes: 512 }, // the head edge
      { op: 'discard', offset: unit, bytes: unit },
      { op: 'discard', offset: 2 * unit, bytes: unit },
      // declined from 3 units on: zeroed instead, up to the end of the range
      { op: 'zero', offset: 3 * unit, bytes: 2 * unit - 512 },
    ]);
    const back = Buffer.alloc(MiB);
    await io.preadv(node, 0, MiB, [back]);
    const expected = Buffer.alloc(MiB, 0xaa);
    expected.fill(0, unit - 512, 5 * unit - 512);
    expect(back.equals(expected)).toBe(true);
  });

  it('mustZero on a node whose discard does not leave zeroes is refused', async () => {
    const below = new BlockNode(new MemoryDriver({ size: MiB }));
    const node = new BlockNode(new MemoryDriver({ size: MiB, unwrittenIsUnallocated: true }), { backing: below });
    await expect(io.pdiscard(node, 0, MiB, { mustZero: true })).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
