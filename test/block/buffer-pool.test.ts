import { describe, expect, it } from 'vitest';
import { BufferPool } from '../../src/block/buffer-pool.js';

describe('BufferPool', () => {
  it('hands out exact sizes and reuses a given-back block for any size of its class', () => {
    const pool = new BufferPool(4 * 1024 * 1024);
    const a = pool.take(1000 * 1024);
    expect(a.length).toBe(1000 * 1024);
    pool.give(a);
    const b = pool.take(600 * 1024); // same 1 MiB class
    expect(b.length).toBe(600 * 1024);
    expect(b.buffer).toBe(a.buffer);
    const c = pool.take(600 * 1024); // the class is empty again: a new block
    expect(c.buffer).not.toBe(a.buffer);
  });

  it('keeps no more idle memory than its bound, and never pools a slice of someone else', () => {
    const pool = new BufferPool(1024 * 1024);
    const blocks = [pool.take(512 * 1024), pool.take(512 * 1024), pool.take(512 * 1024)];
    for (const b of blocks) pool.give(b);
    const again = [pool.take(512 * 1024), pool.take(512 * 1024), pool.take(512 * 1024)];
    expect(again.filter((b) => blocks.some((o) => o.buffer === b.buffer))).toHaveLength(2);
    const foreign = Buffer.alloc(128 * 1024).subarray(64 * 1024);
    pool.give(foreign);
    expect(pool.take(64 * 1024).buffer).not.toBe(foreign.buffer);
  });
});
