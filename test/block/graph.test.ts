/**
 * Graph operations (src/block/graph.ts) on memory nodes: swapping the node
 * under a root while requests come and go, reopening, the child links.
 */
import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { NodeRoot, changeBackingFile, chainOf, graphOf, reopen, replaceNode } from '../../src/block/graph.js';
import { BlkdebugDriver } from '../../src/drivers/blkdebug.js';
import { MemoryDriver } from '../../src/drivers/memory.js';

const SIZE = 1024 * 1024;
const BLOCK = 4096;

/** A memory disk that logs which requests reached it, and can hold them until released. */
class HeldMemory extends MemoryDriver {
  readonly seen: string[] = [];
  private held: Promise<void> | null = null;
  private release: (() => void) | null = null;

  hold(): void {
    this.held = new Promise((resolve) => (this.release = resolve));
  }

  unhold(): void {
    this.release?.();
    this.held = null;
  }

  override async preadv(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    this.seen.push(`read@${offset}`);
    await this.held;
    return super.preadv(offset, bytes, iov);
  }

  override async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
    this.seen.push(`write@${offset}`);
    await this.held;
    return super.pwritev(offset, bytes, iov);
  }
}

/** Let every promise that can make progress make it (no timers involved). */
async function settle(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
}

async function filled(value: number): Promise<{ node: BlockNode; drv: HeldMemory }> {
  const drv = new HeldMemory({ size: SIZE, limits: { requestAlignment: 512 } });
  const node = new BlockNode(drv, { name: `mem${value}` });
  await io.pwritev(node, 0, SIZE, [Buffer.alloc(SIZE, value)]);
  drv.seen.length = 0;
  return { node, drv };
}

describe('replaceNode under a root', () => {
  it('no request is lost, and none is answered by the old node after the switch', async () => {
    const a = await filled(0xaa);
    const b = await filled(0xbb);
    const root = new NodeRoot(a.node);
    a.drv.hold();
    // Requests in flight on the old node when the switch is asked for.
    const before = [0, 1, 2, 3].map((i) => root.run((n) => io.pwritev(n, i * BLOCK, BLOCK, [Buffer.alloc(BLOCK, 0x11)])));
    const beforeRead = Buffer.alloc(BLOCK);
    before.push(root.run((n) => io.preadv(n, 10 * BLOCK, BLOCK, [beforeRead])));
    await settle();
    expect(a.drv.seen).toHaveLength(5);
    const switched = replaceNode(root, b.node);
    // Requests that arrive while the switch waits for the old node.
    const afterReads = [20, 21, 22].map(() => Buffer.alloc(BLOCK));
    const after = afterReads.map((buf, i) => root.run((n) => io.preadv(n, (20 + i) * BLOCK, BLOCK, [buf])));
    after.push(root.run((n) => io.pwritev(n, 30 * BLOCK, BLOCK, [Buffer.alloc(BLOCK, 0x22)])));
    await settle();
    // Held back: neither node has seen them, the old one still holds its five.
    expect(a.drv.seen).toHaveLength(5);
    expect(b.drv.seen).toHaveLength(0);
    expect(root.node).toBe(a.node);
    a.drv.unhold();
    const old = await switched;
    await Promise.all([...before, ...after]);
    expect(old).toBe(a.node);
    expect(root.node).toBe(b.node);
    // The old node answered exactly the requests it had before the switch, the new one all the rest.
    expect(a.drv.seen.sort()).toEqual(['read@40960', 'write@0', 'write@12288', 'write@4096', 'write@8192']);
    expect(b.drv.seen.sort()).toEqual(['read@81920', 'read@86016', 'read@90112', 'write@122880']);
    expect(beforeRead.every((x) => x === 0xaa)).toBe(true);
    for (const buf of afterReads) expect(buf.every((x) => x === 0xbb)).toBe(true);
    // What the old node acknowledged is in it, what came after is in the new one.
    const check = Buffer.alloc(BLOCK);
    await io.preadv(a.node, 0, BLOCK, [check]);
    expect(check.every((x) => x === 0x11)).toBe(true);
    await io.preadv(b.node, 30 * BLOCK, BLOCK, [check]);
    expect(check.every((x) => x === 0x22)).toBe(true);
  });

  it('refuses a node of another size', async () => {
    const root = new NodeRoot(new BlockNode(new MemoryDriver({ size: SIZE })));
    await expect(replaceNode(root, new BlockNode(new MemoryDriver({ size: SIZE * 2 })))).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('a drain stops new requests while it waits, and lets them run afterwards', async () => {
    const a = await filled(1);
    const root = new NodeRoot(a.node);
    a.drv.hold();
    const first = root.run((n) => io.preadv(n, 0, BLOCK, [Buffer.alloc(BLOCK)]));
    await settle();
    let drainedWithNothingInFlight = false;
    const drain = root.drained(async () => {
      drainedWithNothingInFlight = a.drv.seen.length === 1;
    });
    const second = root.run((n) => io.preadv(n, BLOCK, BLOCK, [Buffer.alloc(BLOCK)]));
    await settle();
    expect(a.drv.seen).toEqual(['read@0']);
    a.drv.unhold();
    await Promise.all([first, drain, second]);
    expect(drainedWithNothingInFlight).toBe(true);
    expect(a.drv.seen).toEqual(['read@0', 'read@4096']);
  });
});

describe('graph operations', () => {
  it('reopens a node read-write and back to read-only', async () => {
    const node = new BlockNode(new MemoryDriver({ size: SIZE, readOnly: true }), { name: 'base' });
    await expect(io.pwritev(node, 0, BLOCK, [Buffer.alloc(BLOCK, 1)])).rejects.toMatchObject({ code: 'EROFS' });
    await reopen(node, false);
    await io.pwritev(node, 0, BLOCK, [Buffer.alloc(BLOCK, 1)]);
    await reopen(node, true);
    await expect(io.pwritev(node, 0, BLOCK, [Buffer.alloc(BLOCK, 2)])).rejects.toMatchObject({ code: 'EROFS' });
    const back = Buffer.alloc(BLOCK);
    await io.preadv(node, 0, BLOCK, [back]);
    expect(back.every((x) => x === 1)).toBe(true);
  });

  it('changeBackingFile on a format that records none is refused with a code', async () => {
    const node = new BlockNode(new MemoryDriver({ size: SIZE }), { name: 'mem' });
    await expect(changeBackingFile(node, null, null, null)).rejects.toMatchObject({ code: 'ERR_IMAGE_FORMAT' });
  });

  it('child links show a filter\'s child and the backing chain, with their roles', async () => {
    const base = new BlockNode(new MemoryDriver({ size: SIZE }), { name: 'base' });
    const inner = new BlockNode(new MemoryDriver({ size: SIZE }), { name: 'inner' });
    const top = new BlockNode(new BlkdebugDriver(inner), { name: 'top', backing: base });
    expect(top.children().map((c) => [c.role, c.node.name])).toEqual([
      ['filtered', 'inner'],
      ['backing', 'base'],
    ]);
    expect(graphOf(top).map((g) => [g.role, g.node.name, g.depth])).toEqual([
      ['root', 'top', 0],
      ['filtered', 'inner', 1],
      ['backing', 'base', 1],
    ]);
    expect(chainOf(top).map((n) => n.name)).toEqual(['top', 'base']);
  });
});
