/**
 * Jobs on mounted images: `vdisk jobs` lists a rate-limited stream running in
 * the mount, `vdisk job pause|resume|cancel` act on it, two mounts run a job
 * each at once, and a cancelled stream leaves an image qemu-img finds clean,
 * which a later stream finishes.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { JobInfo } from '../../src/jobs/job.js';
import { CLI, MiB, Mount, isMounted, sh, vdisk, vdiskAsync } from '../helpers/vdisk.js';
import { useScratchDir } from '../helpers/env.js';
import { Nginx } from '../helpers/nginx.js';
import { expectQemuClean, qemuImg, qemuImgInfo } from '../helpers/image.js';

let dir: string;
let nginx: Nginx;
let remote: string;
const SIZE = 32 * MiB;
/**
 * Slow enough that a job still runs after a dozen `vdisk` commands on a busy
 * machine (16 s for the disk), fast enough to finish in the test; the jobs the
 * test stops itself go slower still, for a wider margin.
 */
const RATE = '2M';
const SLOW_RATE = '1M';

useScratchDir({ tools: { nginx: 'nginx-light', 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

const savedXdg = process.env['XDG_RUNTIME_DIR'];
beforeAll(async () => {
  // Control sockets of this file's mounts only: other tests' mounts (their jobs are "stream-1" too) are not asked.
  const run = path.join(dir, 'run');
  fs.mkdirSync(run, { mode: 0o700 });
  process.env['XDG_RUNTIME_DIR'] = run;
  fs.mkdirSync(path.join(dir, 'www'));
  remote = path.join(dir, 'www', 'disk.raw');
  expect(sh(`head -c ${SIZE - 4 * MiB} /dev/urandom > ${remote} && truncate -s ${SIZE} ${remote}`).status).toBe(0);
  nginx = await Nginx.start(path.join(dir, 'www'), dir);
});

afterAll(async () => {
  if (savedXdg === undefined) delete process.env['XDG_RUNTIME_DIR'];
  else process.env['XDG_RUNTIME_DIR'] = savedXdg;
  if (dir) for (const f of fs.readdirSync(dir)) if (f.endsWith('.mnt') && isMounted(path.join(dir, f))) sh(`umount -l ${path.join(dir, f)}`);
  await nginx?.stop();
});

function create(name: string): string {
  const image = path.join(dir, `${name}.qcow2`);
  const r = vdisk(['create', '-f', 'qcow2', '-b', nginx.url('disk.raw'), '-F', 'raw', image]);
  expect(r.status, r.stderr).toBe(0);
  return image;
}

/** `vdisk stream` against a mount, left running; `exited` resolves with its code and output. */
function startStream(image: string, extra: string[] = [], rate = RATE) {
  const child = spawn(process.execPath, [CLI, 'stream', '--output', 'json', '--rate-limit', rate, ...extra, image], { stdio: ['ignore', 'pipe', 'pipe'] });
  const out = { stdout: '', stderr: '' };
  child.stdout.on('data', (d: Buffer) => (out.stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out.stderr += d.toString()));
  const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.on('close', (code) => resolve({ code, ...out })));
  return { child, exited };
}

async function jobsOf(target: string): Promise<JobInfo[]> {
  const r = await vdiskAsync(['jobs', '--output', 'json', target]);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as JobInfo[];
}

/** Poll `vdisk jobs` until job `id` satisfies `ok` (a bounded number of polls, no sleeps). */
async function waitJob(target: string, id: string, ok: (j: JobInfo) => boolean, what: string): Promise<JobInfo> {
  let last: JobInfo | undefined;
  for (let i = 0; i < 150; i++) {
    last = (await jobsOf(target)).find((j) => j.id === id);
    if (last && ok(last)) return last;
  }
  throw new Error(`job ${id} never ${what}; last seen ${JSON.stringify(last)}`);
}

function standsAlone(image: string): void {
  expect(qemuImgInfo(image)).not.toHaveProperty('backing-filename');
  expectQemuClean(image);
  qemuImg(`compare -f qcow2 -F raw ${image} ${remote}`);
}

describe('vdisk jobs and vdisk job', () => {
  it('lists a rate-limited stream running with growing progress; pause freezes it, resume lets it complete', async () => {
    const image = create('pause');
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      const client = startStream(image, ['--drop-backing']);
      // Named by its mountpoint this time: the mount listens under both names.
      const first = await waitJob(mnt, 'stream-1', (j) => j.state === 'running' && j.progress.current > 0, 'ran');
      expect(first).toMatchObject({ type: 'stream', progress: { total: SIZE }, rateLimit: 2 * MiB });
      const grown = await waitJob(mnt, 'stream-1', (j) => j.progress.current > first.progress.current, 'made progress');
      expect(grown.progress.current).toBeLessThan(SIZE);

      // A stream has no ready phase: complete is refused, and so is resuming a job that runs.
      const complete = await vdiskAsync(['job', 'complete', 'stream-1']);
      expect(complete.stderr).toMatch(/^vdisk: error ERR_JOB_STATE: job stream-1 \(stream\) is running, not ready/);
      expect(complete.status).toBe(1);
      expect((await vdiskAsync(['job', 'resume', 'stream-1'])).stderr).toMatch(/ERR_JOB_STATE: job stream-1 is not paused/);

      // Without --mount: the one mount of ours that has stream-1.
      const pause = await vdiskAsync(['job', 'pause', 'stream-1']);
      expect(pause.status, pause.stderr).toBe(0);
      const paused = await waitJob(image, 'stream-1', (j) => j.state === 'paused', 'paused');
      // Paused: progress stays put across further looks (a running job at 2 MiB/s moves between any two).
      for (let i = 0; i < 5; i++) {
        const [now] = await jobsOf(image);
        expect(now).toMatchObject({ state: 'paused', progress: { current: paused.progress.current } });
      }
      expect(paused.progress.current).toBeLessThan(SIZE);

      const resume = await vdiskAsync(['job', 'resume', 'stream-1', '--mount', mnt, '--output', 'json']);
      expect(resume.status, resume.stderr).toBe(0);
      expect(JSON.parse(resume.stdout)).toMatchObject({ id: 'stream-1', state: 'running' });
      const done = await client.exited;
      expect(done.code, done.stderr).toBe(0);
      expect(JSON.parse(done.stdout)).toMatchObject({ done: SIZE, total: SIZE, droppedBacking: true, interrupted: false });
      expect(await jobsOf(image)).toMatchObject([{ id: 'stream-1', state: 'concluded', status: 'completed', progress: { current: SIZE } }]);
      expect(sh(`cmp ${mnt} ${remote}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    standsAlone(image);
  });

  it('runs a job on each of two mounts at once; cancelling one concludes it cancelled, the other runs on, and the image checks clean and resumes', async () => {
    const a = create('two-a');
    const b = create('two-b');
    const ma = await Mount.start(a, `${a}.mnt`);
    const mb = await Mount.start(b, `${b}.mnt`);
    try {
      const ca = startStream(a, [], SLOW_RATE);
      const cb = startStream(b, ['--drop-backing'], SLOW_RATE);
      await waitJob(a, 'stream-1', (j) => j.state === 'running' && j.progress.current > 0, 'ran on a');
      const bRunning = await waitJob(b, 'stream-1', (j) => j.state === 'running' && j.progress.current > 0, 'ran on b');
      // Both are running at this point: a is neither paused nor done.
      expect((await jobsOf(a))[0]).toMatchObject({ state: 'running' });

      // Both mounts have a stream-1: the command will not guess.
      const ambiguous = await vdiskAsync(['job', 'cancel', 'stream-1']);
      expect(ambiguous.stderr).toMatch(/^vdisk: error ERR_USAGE: 2 mounts have a job stream-1: say which with --mount\n$/);
      expect(ambiguous.status).toBe(2);
      expect((await vdiskAsync(['job', 'cancel', 'stream-9', '--mount', b])).stderr).toMatch(/ERR_JOB_NOT_FOUND: no job stream-9/);

      const cancel = await vdiskAsync(['job', 'cancel', 'stream-1', '--mount', b]);
      expect(cancel.status, cancel.stderr).toBe(0);
      const cancelled = await waitJob(b, 'stream-1', (j) => j.state === 'concluded', 'concluded');
      expect(cancelled).toMatchObject({ status: 'cancelled' });
      expect(cancelled).not.toHaveProperty('error');
      expect(cancelled.progress.current).toBeGreaterThanOrEqual(bRunning.progress.current);
      expect(cancelled.progress.current).toBeLessThan(SIZE);
      const bDone = await cb.exited;
      expect(bDone.code).toBe(130);
      expect(JSON.parse(bDone.stdout)).toMatchObject({ interrupted: true, droppedBacking: false });

      // The other mount's job was not touched: it still runs and moves on.
      const aNow = (await jobsOf(a))[0]!;
      expect(aNow.state).toBe('running');
      await waitJob(a, 'stream-1', (j) => j.progress.current > aNow.progress.current, 'moved on');
      ca.child.kill('SIGINT');
      expect((await ca.exited).code).toBe(130);
    } finally {
      expect(await ma.stop()).toBe(0);
      expect(await mb.stop()).toBe(0);
    }
    expectQemuClean(b);
    expect(qemuImgInfo(b)).toHaveProperty('backing-filename', nginx.url('disk.raw'));
    // Offline now: the same job in this command's process picks up where the cancelled one stopped.
    const again = vdisk(['stream', '--drop-backing', '--output', 'json', b]);
    expect(again.status, again.stderr).toBe(0);
    expect((JSON.parse(again.stdout) as { copied: number }).copied).toBeLessThan(SIZE);
    standsAlone(b);
  });

  it('vdisk jobs on an image nobody mounts says so', () => {
    const image = create('idle');
    const r = vdisk(['jobs', image]);
    expect(r.stderr).toMatch(/^vdisk: error ERR_NOT_MOUNTED: no vdisk mount serves \S+idle\.qcow2/);
    expect(r.status).toBe(1);
  });
});
