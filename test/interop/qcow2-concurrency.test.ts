/**
 * Writes racing a zero or discard of the same cluster: whether a write
 * allocates is only sure once the zero has run, so it must serialise then.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import * as io from '../../src/block/io.js';
import { openImage } from '../../src/drivers/chain.js';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, readImage } from '../helpers/image.js';
import { vdisk } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ fuse: false, tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

describe('qcow2 writes racing an unmapping zero of their cluster', () => {
  it('two whole-cluster writes after a zero-with-unmap allocate the cluster once: no leak', async () => {
    const image = path.join(dir, 'race.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', image, '4M']).status).toBe(0);
    const node = await openImage(image, {});
    const cluster = 65536;
    await io.pwritev(node, 0, cluster, [Buffer.alloc(cluster, 1)]);
    // All three start together: both writes see an allocated cluster they could write in place.
    await Promise.all([
      io.pwriteZeroes(node, 0, cluster, { mayUnmap: true }),
      io.pwritev(node, 0, cluster, [Buffer.alloc(cluster, 2)]),
      io.pwritev(node, 0, cluster, [Buffer.alloc(cluster, 3)]),
    ]);
    await node.close();
    expectQemuClean(image);
    const data = (await readImage(image)).subarray(0, cluster);
    // One write or the other, whole: never a mix, never the zeroes of the request before them.
    expect(data.equals(Buffer.alloc(cluster, 2)) || data.equals(Buffer.alloc(cluster, 3))).toBe(true);
  });
});
