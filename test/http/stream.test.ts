/** vdisk stream: on its own, through a mount, interrupted and resumed, then standing alone. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';
import { useScratchDir } from '../helpers/env.js';
import { Nginx } from '../helpers/nginx.js';
import { expectQemuClean, qemuImg, qemuImgInfo } from '../helpers/image.js';

let dir: string;
let nginx: Nginx;
let remote: string;
const SIZE = 96 * MiB;

useScratchDir({ tools: { nginx: 'nginx-light', 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

beforeAll(async () => {
  fs.mkdirSync(path.join(dir, 'www'));
  remote = path.join(dir, 'www', 'disk.raw');
  expect(sh(`head -c ${64 * MiB} /dev/urandom > ${remote} && truncate -s ${SIZE} ${remote}`).status).toBe(0);
  nginx = await Nginx.start(path.join(dir, 'www'), dir);
});

afterAll(async () => {
  await nginx?.stop();
});

function create(name: string, slow = false): string {
  const image = path.join(dir, `${name}.qcow2`);
  const r = vdisk(['create', '-f', 'qcow2', '-b', nginx.url('disk.raw', slow), '-F', 'raw', image]);
  expect(r.status, r.stderr).toBe(0);
  return image;
}

function standsAlone(image: string): void {
  expect(qemuImgInfo(image)).not.toHaveProperty('backing-filename');
  expectQemuClean(image);
  qemuImg(`compare -f qcow2 -F raw ${image} ${remote}`);
}

describe('vdisk stream', () => {
  it('copies what is missing (zero ranges as zero clusters) and drops the backing file', () => {
    const image = create('alone');
    const r = vdisk(['stream', '--drop-backing', '--output', 'json', image]);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ total: SIZE, done: SIZE, droppedBacking: true, interrupted: false });
    standsAlone(image);
    // The 32 MiB tail of the remote file is a hole: zero clusters, no data in the image.
    expect(fs.statSync(image).size).toBeLessThan(70 * MiB);
  });

  it('is interrupted by Ctrl-C and resumes where it stopped', async () => {
    const image = create('resume', true); // slow: still streaming when Ctrl-C arrives
    const child = spawn(process.execPath, [CLI, 'stream', '-p', image], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    await new Promise<void>((resolve) => {
      child.stderr.on('data', (d: Buffer) => {
        err += d.toString();
        if (/copied [1-9]/.test(err)) resolve();
      });
      void exited.then(() => resolve()); // finished before Ctrl-C: the exit code below says so
    });
    child.kill('SIGINT');
    const code = await exited;
    expect(code).toBe(130);
    expect(err).toMatch(/interrupted at .*%: run it again to resume/);
    const again = vdisk(['stream', '--drop-backing', '--output', 'json', image]);
    expect(again.status, again.stderr).toBe(0);
    const result = JSON.parse(again.stdout) as { copied: number; total: number };
    expect(result.copied).toBeLessThan(SIZE);
    standsAlone(image);
  });

  it('on a mounted image, Ctrl-C on the client and stopping the mount each interrupt the job, which resumes', async () => {
    const image = create('mounted-stop', true); // still streaming when it is stopped
    const m = await Mount.start(image, `${image}.mnt`);
    /** Start `vdisk stream -p` against the mount; resolves once it has copied something. */
    const startClient = async () => {
      const child = spawn(process.execPath, [CLI, 'stream', '-p', '--drop-backing', image], { stdio: ['ignore', 'pipe', 'pipe'] });
      const out = { err: '' };
      const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
      await new Promise<void>((resolve) => {
        child.stderr.on('data', (d: Buffer) => {
          out.err += d.toString();
          if (/copied [1-9]/.test(out.err)) resolve();
        });
        void exited.then(() => resolve());
      });
      return { child, out, exited };
    };
    try {
      const first = await startClient();
      first.child.kill('SIGINT');
      expect(await first.exited, first.out.err).toBe(130);
      expect(first.out.err).toMatch(/interrupted at .*%: run it again to resume/);
      // Stopping the mount stops the job it runs for a client, rather than finishing it first.
      const second = await startClient();
      expect(await m.stop()).toBe(0);
      expect(await second.exited, second.out.err).toBe(130);
      expect(second.out.err).toMatch(/interrupted at .*%/);
    } finally {
      await m.stop();
    }
    expect(qemuImgInfo(image)).toHaveProperty('backing-filename', nginx.url('disk.raw', true));
    const again = vdisk(['stream', '--drop-backing', '--output', 'json', image]);
    expect(again.status, again.stderr).toBe(0);
    expect((JSON.parse(again.stdout) as { copied: number }).copied).toBeLessThan(SIZE);
    standsAlone(image);
  });

  it('runs inside the mount when the image is mounted, while the disk stays in use', async () => {
    const image = create('mounted');
    const m = await Mount.start(image, `${image}.mnt`, ['--copy-on-read']);
    try {
      // A second writer is refused: the mount holds the image.
      const locked = vdisk(['check', '-r', 'leaks', image]);
      expect(locked.stderr).toMatch(/EBUSY: .*in use/);
      const r = vdisk(['stream', '--drop-backing', image]);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/backing file dropped/);
      expect(sh(`cmp ${image}.mnt ${remote}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    standsAlone(image);
  });
});
