/**
 * The guard of a probed raw image, through the request layer: no write, in one
 * piece or several, write-zeroes or discard, may leave the first sector probing
 * as another format; everything else passes.
 */
import { describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import * as io from '../../src/block/io.js';
import { probeHead } from '../../src/drivers/registry.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { ProbedRawDriver } from '../../src/drivers/probed-raw.js';

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

function guarded(nativeZeroes = true): { node: BlockNode; head: () => Promise<Buffer> } {
  const mem = new MemoryDriver({ size: 1024 * 1024, nativeZeroes });
  const node = new BlockNode(new ProbedRawDriver(mem, 'guest.img', probeHead));
  const head = async () => {
    const b = Buffer.alloc(512);
    await io.preadv(node, 0, 512, [b]);
    return b;
  };
  return { node, head };
}

describe('probed raw guard', () => {
  it('refuses a qcow2 header in sector 0 with EPERM and leaves the sector as it was', async () => {
    const { node, head } = guarded();
    await io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 0x11)]);
    const header = Buffer.alloc(4096);
    QCOW2_MAGIC.copy(header);
    await expect(io.pwritev(node, 0, 4096, [header])).rejects.toMatchObject({ code: 'EPERM', message: expect.stringMatching(/probe as qcow2.*-f raw/) });
    expect((await head()).equals(Buffer.alloc(512, 0x11))).toBe(true);
  });

  it('refuses a header assembled from two partial writes, even when they run side by side', async () => {
    const { node, head } = guarded();
    const [a, b] = await Promise.allSettled([io.pwritev(node, 0, 2, [QCOW2_MAGIC.subarray(0, 2)]), io.pwritev(node, 2, 2, [QCOW2_MAGIC.subarray(2, 4)])]);
    // Whichever came second would complete the magic: exactly one is refused.
    expect([a.status, b.status].sort()).toEqual(['fulfilled', 'rejected']);
    expect(probeHead(await head())).toBe('raw');
  });

  it('refuses write-zeroes and discard that would complete a magic (QED\\0)', async () => {
    for (const op of ['zero', 'discard'] as const) {
      const { node, head } = guarded();
      await io.pwritev(node, 0, 4, [Buffer.from('QEDx', 'latin1')]);
      const run = op === 'zero' ? io.pwriteZeroes(node, 3, 1) : io.pdiscard(node, 3, 1);
      await expect(run).rejects.toMatchObject({ code: 'EPERM' });
      expect(probeHead(await head())).toBe('raw');
      expect((await head()).subarray(0, 4).toString('latin1')).toBe('QEDx');
    }
  });

  it('lets ordinary writes to sector 0 and any write past it through', async () => {
    const { node, head } = guarded();
    const mbr = Buffer.alloc(512);
    mbr.writeUInt16BE(0x55aa, 510);
    await io.pwritev(node, 0, 512, [mbr]);
    expect((await head()).equals(mbr)).toBe(true);
    const past = Buffer.alloc(512);
    QCOW2_MAGIC.copy(past);
    await io.pwritev(node, 512, 512, [past]);
    await io.pwriteZeroes(node, 0, 4096);
    expect((await head()).equals(Buffer.alloc(512))).toBe(true);
  });
});

describe('probeHead', () => {
  const head = (text: string) => Buffer.from(text.padEnd(512, '\0'), 'latin1');
  it.each([
    ['a VMDK descriptor', '# Disk DescriptorFile\nversion=1\nRW 8 FLAT "/etc/shadow" 0\n', 'vmdk'],
    ['one after blank lines of spaces and CRLF', '#c\r\n   \r\n \nversion=3\r\n', 'vmdk'],
    ['a VMware 3 sparse header', 'COWD\x01\0\0\0', 'vmdk'],
    ['text before the version line', 'hello\nversion=1\n', 'raw'],
    ['an indented version line', '  version=1\n', 'raw'],
    ['another version', 'version=4\n', 'raw'],
    ['a comment running past the sector', `#${'x'.repeat(600)}\nversion=1\n`, 'raw'],
  ])('%s probes as QEMU probes it', (_what, text, format) => {
    expect(probeHead(head(text).subarray(0, 512))).toBe(format);
  });
});
