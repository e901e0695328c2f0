/** Many writes in flight on qcow2: fio with crc32c verification, several jobs, QD16, then qemu-img check. */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean } from '../helpers/image.js';
import { MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ tools: { fio: 'fio', 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

describe('fio on qcow2', () => {
  it.each([
    ['v3 64k', 'cluster_size=64k', false],
    ['v3 64k over a backing file', 'cluster_size=64k', true],
    ['extended L2, 32k', 'cluster_size=32k,extended_l2=on', true],
    ['v2 4k', 'compat=0.10,cluster_size=4k', false],
  ] as const)('%s: 4 jobs of 4k-128k random writes at QD16 verify, and the image checks clean', async (name, opts, backing) => {
    const slug = name.replace(/\W+/g, '-');
    const image = path.join(dir, `${slug}.qcow2`);
    const args = ['create', '-f', 'qcow2', '-o', opts];
    if (backing) {
      const base = path.join(dir, `${slug}.base`);
      expect(sh(`head -c ${64 * MiB} /dev/urandom > ${base}`).status).toBe(0);
      args.push('-b', base, '-F', 'raw', image);
    } else args.push(image, String(64 * MiB));
    expect(vdisk(args).status).toBe(0);
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      // Jobs share clusters at their region edges (offsets not cluster aligned): allocations race.
      const r = sh(
        `fio --name=v --filename=${mnt} --rw=randwrite --bsrange=4k-128k --size=15M --offset=1000k --offset_increment=15M ` +
          `--numjobs=4 --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 ` +
          `--verify_state_save=0 --group_reporting --output-format=terse`,
      );
      expect(r.status, r.stderr + r.stdout.slice(-1000)).toBe(0);
      expect(sh(`fio --name=v --filename=${mnt} --rw=randread --bs=4k --size=60M --ioengine=libaio --iodepth=16 --direct=1 --runtime=2 --time_based --output-format=terse`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(image);
    // What fio verified through the mount is what qemu reads from the image.
    const again = sh(
      `qemu-img convert -O raw ${image} ${image}.raw && fio --name=v --filename=${image}.raw --rw=randwrite --bsrange=4k-128k --size=15M --offset=1000k ` +
        `--offset_increment=15M --numjobs=4 --verify=crc32c --verify_only=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse`,
    );
    expect(again.status, again.stderr).toBe(0);
  });
});
