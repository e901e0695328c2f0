/** fio with crc32c verification, several jobs at once, through the page cache and with O_DIRECT. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { MiB, Mount, sh } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ tools: { fio: 'fio' } }, (d) => (dir = d));

describe('fio verify through the mount', () => {
  it.each([
    ['buffered', 0, []],
    ['O_DIRECT', 1, []],
    ['O_DIRECT on a --direct-io mount', 1, ['--direct-io']],
  ] as const)('%s: 4 jobs of random 4k-256k writes verify with crc32c', async (_name, direct, args) => {
    const image = path.join(dir, `fio-${direct}-${args.length}.img`);
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 128 * MiB);
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt, [...args]);
    try {
      // Each job owns a 32 MiB region (offset_increment) so verification is exact.
      const r = sh(
        `fio --name=verify --filename=${mnt} --rw=randwrite --bsrange=4k-256k --size=32M --offset_increment=32M --numjobs=4 ` +
          `--ioengine=libaio --iodepth=8 --direct=${direct} --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting --output-format=json`,
      );
      expect(r.status, r.stderr + r.stdout.slice(-2000)).toBe(0);
      const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; write: { io_bytes: number } }> };
      expect(json.jobs[0]!.error).toBe(0);
      expect(json.jobs[0]!.write.io_bytes).toBeGreaterThanOrEqual(128 * MiB);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    // What fio verified through the mount is what the image file holds.
    const again = sh(`fio --name=verify --filename=${image} --rw=randwrite --bsrange=4k-256k --size=32M --offset_increment=32M --numjobs=4 --verify=crc32c --verify_only=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse`);
    expect(again.status, again.stderr).toBe(0);
  });
});
