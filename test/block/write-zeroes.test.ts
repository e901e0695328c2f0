import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { MAX_ZERO_BOUNCE_BYTES } from '../../src/block/limits.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { VdiskError } from '../../src/errors.js';

const TiB = 1024 ** 4;

describe('write-zeroes', () => {
  it('falls back to writing zeroes from one bounded buffer: 1 TiB in constant memory', async () => {
    // A 1 TiB null device with 4 KiB alignment and no native write-zeroes.
    const driver = new MemoryDriver({ size: TiB, keepData: false, limits: { requestAlignment: 4096, maxTransfer: 16 * 1024 * 1024 } });
    const node = new BlockNode(driver);
    global.gc?.();
    const before = process.memoryUsage();
    await io.pwriteZeroes(node, 100, TiB - 200);
    const after = process.memoryUsage();
    // Head and tail blocks by read-modify-write, the aligned middle from the zero buffer: every block once.
    expect(driver.bytesWritten).toBe(TiB);
    expect(driver.largestWriteBuffer).toBeLessThanOrEqual(MAX_ZERO_BOUNCE_BYTES);
    expect(after.rss - before.rss).toBeLessThan(64 * 1024 * 1024);
    expect(after.arrayBuffers - before.arrayBuffers).toBeLessThan(16 * 1024 * 1024);
  });

  it('uses the native zero operation when the driver has one and falls back only when it says ENOTSUP', async () => {
    const driver = new MemoryDriver({ size: 64 * 1024 * 1024, nativeZeroes: true, limits: { requestAlignment: 4096 } });
    const node = new BlockNode(driver);
    await io.pwritev(node, 0, 1024 * 1024, [Buffer.alloc(1024 * 1024, 0xaa)]);
    driver.bytesWritten = 0;
    await io.pwriteZeroes(node, 4096, 512 * 1024);
    expect(driver.bytesWritten).toBe(0);
    const back = Buffer.alloc(1024 * 1024);
    await io.preadv(node, 0, back.length, [back]);
    expect(back.subarray(0, 4096).every((b) => b === 0xaa)).toBe(true);
    expect(back.subarray(4096, 4096 + 512 * 1024).every((b) => b === 0)).toBe(true);
    expect(back.subarray(4096 + 512 * 1024).every((b) => b === 0xaa)).toBe(true);

    // ENOTSUP from the driver (MemoryDriver without nativeZeroes says so): zeroes are written instead.
    const plain = new MemoryDriver({ size: 64 * 1024 * 1024, limits: { requestAlignment: 4096 } });
    const plainNode = new BlockNode(plain);
    await io.pwritev(plainNode, 0, 1024 * 1024, [Buffer.alloc(1024 * 1024, 0xaa)]);
    plain.bytesWritten = 0;
    await io.pwriteZeroes(plainNode, 4096, 512 * 1024);
    expect(plain.bytesWritten).toBe(512 * 1024);
    await io.preadv(plainNode, 0, back.length, [back]);
    expect(back.subarray(4096, 4096 + 512 * 1024).every((b) => b === 0)).toBe(true);
    expect(back.subarray(0, 4096).every((b) => b === 0xaa)).toBe(true);

    // Any other error is the answer: no fallback that would hide it (or write zeroes where the driver failed).
    class FailingZeroes extends MemoryDriver {
      override async pwriteZeroes(): Promise<void> {
        throw new VdiskError('EIO', 'write-zeroes failed');
      }
    }
    const failing = new FailingZeroes({ size: 64 * 1024 * 1024, limits: { requestAlignment: 4096 } });
    const failingNode = new BlockNode(failing);
    await io.pwritev(failingNode, 0, 1024 * 1024, [Buffer.alloc(1024 * 1024, 0xaa)]);
    failing.bytesWritten = 0;
    await expect(io.pwriteZeroes(failingNode, 4096, 512 * 1024)).rejects.toMatchObject({ code: 'EIO' });
    expect(failing.bytesWritten).toBe(0);
    await io.preadv(failingNode, 0, back.length, [back]);
    expect(back.every((b) => b === 0xaa)).toBe(true);
  });

  it('zeroes unaligned heads and tails inside their blocks, keeping the neighbours', async () => {
    const driver = new MemoryDriver({ size: 1024 * 1024, limits: { requestAlignment: 4096 } });
    const node = new BlockNode(driver);
    await io.pwritev(node, 0, 65536, [Buffer.alloc(65536, 0x55)]);
    await io.pwriteZeroes(node, 1, 1);
    await io.pwriteZeroes(node, 4095, 4098);
    await io.pwriteZeroes(node, 20000, 511);
    const back = Buffer.alloc(65536);
    await io.preadv(node, 0, back.length, [back]);
    const expected = Buffer.alloc(65536, 0x55);
    expected.fill(0, 1, 2);
    expected.fill(0, 4095, 4095 + 4098);
    expected.fill(0, 20000, 20511);
    expect(back.equals(expected)).toBe(true);
  });

  it('detect-zeroes turns all-zero writes into write-zeroes', async () => {
    const driver = new MemoryDriver({ size: 1024 * 1024, nativeZeroes: true });
    const node = new BlockNode(driver, { detectZeroes: 'unmap' });
    await io.pwritev(node, 0, 65536, [Buffer.alloc(65536)]);
    expect(driver.bytesWritten).toBe(0);
    expect(await driver.allocatedBytes()).toBe(0);
    await io.pwritev(node, 0, 65536, [Buffer.alloc(65536, 1)]);
    expect(driver.bytesWritten).toBe(65536);
  });

  it("a partial zero unit (the driver's pwriteZeroesAlignment) is one write-zeroes if the rest reads zero, else zeroes as data", async () => {
    // A driver with 64 KiB zero units (like qcow2 clusters) on 512-byte requests.
    const unit = 65536;
    const driver = new MemoryDriver({ size: 1024 * 1024, nativeZeroes: true, limits: { requestAlignment: 512, pwriteZeroesAlignment: unit } });
    driver.recordCalls = true;
    const node = new BlockNode(driver);
    const writes = () => driver.calls.filter((c) => c.op !== 'read');

    // The rest of the unit reads zero: the whole unit is zeroed, nothing written as data.
    await io.pwriteZeroes(node, 1000, 3000);
    expect(writes()).toEqual([{ op: 'zero', offset: 0, bytes: unit }]);

    // Data elsewhere in the unit: the zeroes are written as data, in whole
    // 512-byte blocks, and the data survives.
    await io.pwritev(node, unit + 60000, 512, [Buffer.alloc(512, 0xcc)]);
    driver.calls.length = 0;
    await io.pwriteZeroes(node, unit + 1000, 3000);
    expect(writes()).toEqual([{ op: 'write', offset: unit + 512, bytes: 3584 }]);
    const back = Buffer.alloc(unit);
    await io.preadv(node, unit, unit, [back]);
    const expected = Buffer.alloc(unit);
    expected.fill(0xcc, 60000, 60512);
    expect(back.equals(expected)).toBe(true);

    // Whole units in the middle go to the driver as they are; the partial ends follow the rule.
    driver.calls.length = 0;
    await io.pwriteZeroes(node, 3 * unit - 512, 2 * unit + 1024);
    expect(writes()).toEqual([
      { op: 'zero', offset: 2 * unit, bytes: unit },
      { op: 'zero', offset: 3 * unit, bytes: 2 * unit },
      { op: 'zero', offset: 5 * unit, bytes: unit },
    ]);
    // Every write-zeroes the driver saw was whole units.
    expect(driver.calls.filter((c) => c.op === 'zero').every((c) => c.offset % unit === 0 && c.bytes % unit === 0)).toBe(true);
  });

  it('a zero unit cut short by the end of the node counts as whole', async () => {
    const unit = 65536;
    const size = 2 * unit + 4096;
    const driver = new MemoryDriver({ size, nativeZeroes: true, limits: { requestAlignment: 512, pwriteZeroesAlignment: unit } });
    driver.recordCalls = true;
    const node = new BlockNode(driver);
    await io.pwriteZeroes(node, 2 * unit, 4096);
    await io.pwriteZeroes(node, 2 * unit + 512, 1024);
    expect(driver.calls.filter((c) => c.op !== 'read')).toEqual([
      { op: 'zero', offset: 2 * unit, bytes: 4096 },
      { op: 'zero', offset: 2 * unit, bytes: 4096 },
    ]);
  });
});
