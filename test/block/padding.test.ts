import { describe, expect, it } from 'vitest';
import { computePadding } from '../../src/block/padding.js';

describe('computePadding', () => {
  it.each([
    // offset, bytes, align, expected
    [0, 4096, 4096, null],
    [8192, 8192, 4096, null],
    [1, 1, 4096, { offset: 0, bytes: 4096, head: 1, tail: 4094 }],
    [511, 1, 512, { offset: 0, bytes: 512, head: 511, tail: 0 }],
    [4095, 2, 4096, { offset: 0, bytes: 8192, head: 4095, tail: 4095 }],
    [4096, 511, 4096, { offset: 4096, bytes: 4096, head: 0, tail: 3585 }],
    [10000, 100000, 4096, { offset: 8192, bytes: 102400, head: 1808, tail: 592 }],
    [7, 9, 1, null],
  ])('offset=%d bytes=%d align=%d', (offset, bytes, align, expected) => {
    const pad = computePadding(offset, bytes, align);
    expect(pad).toEqual(expected);
    if (pad) {
      expect(pad.offset % align).toBe(0);
      expect(pad.bytes % align).toBe(0);
      expect(pad.offset + pad.head).toBe(offset);
      expect(pad.offset + pad.bytes - pad.tail).toBe(offset + bytes);
    }
  });
});
