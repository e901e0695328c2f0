/**
 * kill -9: `vdisk mount` of a qcow2 overlay (the CLI, as users run it) takes
 * seeded writes, zero ranges, punches and fsyncs through FUSE and is killed
 * at a random point, possibly with a request in flight. The host page cache
 * survives a kill, so this cannot see write ordering (power-cut.test.ts does);
 * it proves that whatever vdisk had done when it died leaves an image that
 * `qemu-img check` accepts (leaks allowed), that vdisk reopens, read-only and
 * writable, and that holds every fsync'd write.
 *
 * CRASH_TRIALS=100 npx vitest run test/crash/kill9.test.ts for a long run.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';
import * as io from '../../src/block/io.js';
import { openImage } from '../../src/drivers/chain.js';
import { useScratchDir } from '../helpers/env.js';
import { Mount, isMounted } from '../helpers/vdisk.js';
import { rng } from '../helpers/workload.js';
import { BLOCK, CONFIGS, checkBlocks, qemuCheck, clusterSizeOf, makeBacking, makeOps, makeOverlay, runOp, trialCount } from './guest-workload.js';

let dir = '';
useScratchDir({ tools: { 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils' } }, (d) => (dir = d));
let backing = '';
beforeAll(() => {
  backing = path.join(dir, 'backing.raw');
  makeBacking(backing);
});


describe('kill -9 of vdisk mount', () => {
  it("leaves a qcow2 overlay that qemu-img accepts, vdisk reopens and that holds all fsync'd data", async () => {
    const trials = trialCount(20);
    const failures: string[] = [];
    for (let t = 0; t < trials; t++) {
      const cfg = CONFIGS[t % CONFIGS.length]!;
      const seed = 9001 + t;
      const rand = rng(Math.imul(seed, 0x9e3779b1) ^ 0x5a5a5a5a);
      const image = path.join(dir, `k${t}.qcow2`);
      const mnt = path.join(dir, `k${t}.mnt`);
      makeOverlay(image, cfg, backing);
      const ops = makeOps(seed, cfg, 40);
      // Killed while op `killAt` is in flight (or about to be sent), after 0-3 turns of this event loop.
      const killAt = 4 + Math.floor(rand() * (ops.length - 4));
      const turns = Math.floor(rand() * 4);
      // Half the trials with direct I/O, half with a tiny L2 cache (flushes forced by dirty tables).
      const args = [...(rand() < 0.5 ? ['--direct-io'] : []), ...(t % 2 ? ['--l2-cache-size', String(4 * clusterSizeOf(cfg))] : [])];
      const m = await Mount.start(image, mnt, args);
      let durableFsync = -1;
      const fh = await fs.promises.open(mnt, 'r+');
      try {
        for (let i = 0; i < killAt; i++) {
          await runOp(fh, seed, ops[i]!, i);
          if (ops[i]!.kind === 'fsync') durableFsync = i;
        }
        const inFlight = runOp(fh, seed, ops[killAt]!, killAt).catch(() => undefined);
        for (let k = 0; k < turns; k++) await new Promise((resolve) => setImmediate(resolve));
        m.proc.kill('SIGKILL');
        await m.exited;
        await inFlight;
      } finally {
        await fh.close().catch(() => undefined);
      }
      // umount(8) rather than `vdisk unmount` (test/fuse/lifecycle.test.ts covers that): one node start less per trial.
      const un = spawnSync('umount', [mnt], { encoding: 'utf8' });
      if (un.status !== 0 || isMounted(mnt)) throw new Error(`cannot unmount ${mnt} after the kill: ${un.stderr}`);

      const where = `seed ${seed} (${cfg.name}), killed at op ${killAt} (${ops[killAt]!.kind})`;
      const qemu = qemuCheck(image);
      if (qemu) failures.push(`${where}: ${qemu}`);
      try {
        const node = await openImage(image, { readOnly: true, format: 'qcow2' });
        try {
          const read = async (b: number) => {
            const buf = Buffer.alloc(BLOCK);
            await io.preadv(node, b * BLOCK, BLOCK, [buf]);
            return buf;
          };
          for (const p of await checkBlocks(read, seed, ops, cfg, { durableFsync, maybeEnd: killAt + 1 })) failures.push(`${where}: ${p}`);
        } finally {
          await node.close();
        }
        // A writable reopen (what the next mount does) leaves an image qemu-img still accepts.
        await (await openImage(image, { format: 'qcow2' })).close();
        const again = qemuCheck(image);
        if (again) failures.push(`${where}: after a writable reopen by vdisk: ${again}`);
      } catch (err) {
        failures.push(`${where}: vdisk cannot reopen it: ${(err as Error).message}`);
      }
      fs.rmSync(image);
      fs.rmSync(mnt, { force: true });
    }
    expect(failures.slice(0, 12), `${failures.length} problems in ${trials} trials`).toEqual([]);
  }, 120_000 + trialCount(20) * 10_000); // a long run (CRASH_TRIALS) gets the time it needs
});
