/** Write notifiers on a node: every write, write-zeroes and discard is heard before and after it lands. */
import { describe, expect, it } from 'vitest';
import { BlockNode, type WriteEvent } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { VdiskError } from '../../src/errors.js';

const MiB = 1024 * 1024;

function memoryNode(options: ConstructorParameters<typeof MemoryDriver>[0], nodeOptions: ConstructorParameters<typeof BlockNode>[1] = {}) {
  const driver = new MemoryDriver(options);
  driver.recordCalls = true;
  return { driver, node: new BlockNode(driver, nodeOptions) };
}

describe('write notifiers', () => {
  it('hear writes, write-zeroes and discards with the asked range, before the driver sees them and after', async () => {
    const { driver, node } = memoryNode({ size: 4 * MiB, nativeZeroes: true, limits: { requestAlignment: 512, pdiscardAlignment: 65536 } }, { detectZeroes: 'on' });
    const log: string[] = [];
    const stop = node.addWriteNotifier({
      before: (ev) => void log.push(`before ${ev.kind} ${ev.offset}+${ev.bytes} driverCalls=${driver.calls.filter((c) => c.op !== 'read').length}`),
      after: (ev, err) => void log.push(`after ${ev.kind} ${ev.offset}+${ev.bytes}${err ? ' failed' : ''} driverCalls=${driver.calls.filter((c) => c.op !== 'read').length}`),
    });
    await io.pwritev(node, 100, 1000, [Buffer.alloc(1000, 1)]); // unaligned: read-modify-write
    await io.pwritev(node, 65536, 4096, [Buffer.alloc(4096)]); // detect-zeroes: heard as write-zeroes
    await io.pwriteZeroes(node, 8192, 4096);
    await io.pdiscard(node, 1000, 200000); // rounded inward to [65536, 196608)
    await io.preadv(node, 0, 4096, [Buffer.alloc(4096)]); // reads are not heard
    expect(log).toEqual([
      'before write 100+1000 driverCalls=0',
      'after write 100+1000 driverCalls=1',
      'before zero 65536+4096 driverCalls=1',
      'after zero 65536+4096 driverCalls=2',
      'before zero 8192+4096 driverCalls=2',
      'after zero 8192+4096 driverCalls=3',
      'before discard 65536+131072 driverCalls=3',
      'after discard 65536+131072 driverCalls=4',
    ]);
    stop();
    await io.pwritev(node, 0, 512, [Buffer.alloc(512, 2)]);
    expect(log).toHaveLength(8);
  });

  it('a request waits for an async before(); a failed request is heard with its error', async () => {
    class FailingWrites extends MemoryDriver {
      fail = false;
      override async pwritev(offset: number, bytes: number, iov: Buffer[]): Promise<void> {
        if (this.fail) throw new VdiskError('EIO', 'write failed');
        return super.pwritev(offset, bytes, iov);
      }
    }
    const driver = new FailingWrites({ size: MiB });
    const node = new BlockNode(driver);
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const heard: Array<{ ev: WriteEvent; err: unknown }> = [];
    node.addWriteNotifier({ before: () => gate, after: (ev, err) => void heard.push({ ev, err }) });
    let landed = false;
    const write = io.pwritev(node, 0, 512, [Buffer.alloc(512, 7)]).then(() => (landed = true));
    // Let the request run as far as it can: it must be held at before().
    for (let i = 0; i < 20; i++) await Promise.resolve();
    expect(landed).toBe(false);
    expect(driver.bytesWritten).toBe(0);
    release();
    await write;
    expect(driver.bytesWritten).toBe(512);

    driver.fail = true;
    await expect(io.pwritev(node, 512, 512, [Buffer.alloc(512, 7)])).rejects.toMatchObject({ code: 'EIO' });
    expect(heard.map((h) => [h.ev.kind, h.ev.offset, (h.err as VdiskError | undefined)?.code])).toEqual([
      ['write', 0, undefined],
      ['write', 512, 'EIO'],
    ]);
  });

  it('a notifier added while others are being called is heard from the next request on', async () => {
    const { node } = memoryNode({ size: MiB });
    const seen: string[] = [];
    node.addWriteNotifier({
      before: () => {
        seen.push('first');
        node.addWriteNotifier({ before: () => void seen.push('second') });
      },
    });
    await io.pwritev(node, 0, 512, [Buffer.alloc(512, 1)]);
    expect(seen).toEqual(['first']);
  });
});
