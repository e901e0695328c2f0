/** Read-modify-write through the request layer on a driver that needs 4 KiB alignment. */
import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { MemoryDriver } from '../../src/drivers/memory.js';

const ALIGN = 4096;

function makeNode(size = 1024 * 1024, maxTransfer = 64 * 1024) {
  const driver = new MemoryDriver({ size, limits: { requestAlignment: ALIGN, maxTransfer } });
  driver.recordCalls = true;
  return { node: new BlockNode(driver), driver };
}

async function readAll(node: BlockNode): Promise<Buffer> {
  const buf = Buffer.alloc(node.size());
  await io.preadv(node, 0, buf.length, [buf]);
  return buf;
}

function pattern(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (seed * 131 + i * 7 + 1) & 0xff;
  return b;
}

describe('request layer padding', () => {
  it('unaligned reads and writes of many sizes round-trip, and the driver only sees aligned requests', async () => {
    const { node, driver } = makeNode();
    const model = Buffer.alloc(node.size());
    const cases = [
      [0, 1], [1, 1], [511, 1], [4095, 1], [4095, 2], [4096, 511], [100, 5000], [8191, 70000], [300000, 131073], [1024 * 1024 - 1, 1],
    ] as const;
    for (const [i, [offset, bytes]] of cases.entries()) {
      const data = pattern(bytes, i + 1);
      await io.pwritev(node, offset, bytes, [data]);
      data.copy(model, offset);
      const back = Buffer.alloc(bytes);
      // Split the read buffer to exercise scatter-gather.
      const half = Math.floor(bytes / 2);
      await io.preadv(node, offset, bytes, [back.subarray(0, half), back.subarray(half)]);
      expect(back.equals(data)).toBe(true);
    }
    expect((await readAll(node)).equals(model)).toBe(true);
    for (const call of driver.calls) {
      expect(call.offset % ALIGN).toBe(0);
      expect(call.bytes % ALIGN).toBe(0);
      expect(call.bytes).toBeLessThanOrEqual(64 * 1024);
    }
  });

  it('concurrent unaligned writes to different bytes of the same blocks all survive', async () => {
    const { node } = makeNode(64 * 1024);
    const model = Buffer.alloc(node.size());
    // 200 writes of 1..700 bytes at distinct, interleaved positions in 4 blocks:
    // without serialised read-modify-write, most of them would be lost.
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < 200; i++) {
      const offset = i * 80 + (i % 3);
      const bytes = 1 + ((i * 37) % 79);
      const data = pattern(bytes, i + 7);
      data.copy(model, offset);
      writes.push(io.pwritev(node, offset, bytes, [data]));
    }
    await Promise.all(writes);
    expect((await readAll(node)).equals(model)).toBe(true);
  });

  it('overlapping concurrent writes leave each byte from one of the writers, never stale data', async () => {
    const { node } = makeNode(32 * 1024);
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < 50; i++) {
      writes.push(io.pwritev(node, 1000 + i * 3, 6000, [Buffer.alloc(6000, i + 1)]));
    }
    await Promise.all(writes);
    const all = await readAll(node);
    // Which writer wins where is up to the layer, but every byte must hold the value of a
    // writer whose range covers it: a read-modify-write that put back stale padding would
    // leave zero, or a writer's value outside that writer's range. Uncovered bytes stay zero.
    const wrong: string[] = [];
    for (let off = 0; off < all.length; off++) {
      const writer = all[off]! - 1; // writer i wrote i + 1 over [1000 + 3i, 7000 + 3i)
      const covered = off >= 1000 && off < 1000 + 49 * 3 + 6000;
      const ok = covered ? writer >= 0 && writer < 50 && off >= 1000 + writer * 3 && off < 7000 + writer * 3 : all[off] === 0;
      if (!ok && wrong.length < 5) wrong.push(`byte ${off} = ${all[off]}`);
    }
    expect(wrong).toEqual([]);
  });

  it('rejects requests past the end and writes to read-only nodes', async () => {
    const { node } = makeNode(8192);
    await expect(io.preadv(node, 8000, 200, [Buffer.alloc(200)])).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(io.pwritev(node, -1, 1, [Buffer.alloc(1)])).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(io.pwritev(node, 0, 2, [Buffer.alloc(1)])).rejects.toMatchObject({ code: 'EINVAL' });
    const ro = new BlockNode(new MemoryDriver({ size: 8192, readOnly: true }));
    await expect(io.pwritev(ro, 0, 1, [Buffer.alloc(1)])).rejects.toMatchObject({ code: 'EROFS' });
    await expect(io.pwriteZeroes(ro, 0, 4096)).rejects.toMatchObject({ code: 'EROFS' });
  });

  it('splits requests at maxTransfer', async () => {
    const { node, driver } = makeNode(1024 * 1024, 16 * 1024);
    await io.pwritev(node, 0, 100 * 1024, [pattern(100 * 1024, 3)]);
    const writes = driver.calls.filter((c) => c.op === 'write');
    expect(writes.map((c) => c.bytes)).toEqual([16384, 16384, 16384, 16384, 16384, 16384, 4096]);
  });
});
