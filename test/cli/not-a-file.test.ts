/**
 * An image or backing file that is not a regular file (a FIFO, a character
 * device) is refused with one line and a non-zero exit, promptly: open(2) of a
 * FIFO would wait for a writer forever, and opening a device can act on it.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openRegularFile } from '../../src/drivers/regular-file.js';
import { useScratchDir } from '../helpers/env.js';
import { CLI, isMounted, sh } from '../helpers/vdisk.js';

/** Far above how long a refusal takes: a command still running then is blocked in open(). */
const COMMAND_TIMEOUT_MS = 30_000;

let dir: string;
useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

afterAll(() => {
  for (const f of dir ? fs.readdirSync(dir) : []) {
    const p = path.join(dir, f);
    if (isMounted(p)) sh(`umount -l ${p}`);
  }
});

/** The CLI, killed if still running after COMMAND_TIMEOUT_MS (a process blocked opening a FIFO can be). */
function vdiskBounded(args: string[]): Promise<{ status: number | null; stderr: string; hung: boolean }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: COMMAND_TIMEOUT_MS, killSignal: 'SIGKILL' }, (err, _stdout, stderr) => {
      const e = err as { code?: unknown; killed?: boolean } | null;
      resolve({ status: e ? (typeof e.code === 'number' ? e.code : null) : 0, stderr, hung: Boolean(e?.killed) });
    });
  });
}

/** `args` for each of info, map, check and mount on `image`. */
function commands(image: string, tag: string): Array<[string, string[]]> {
  const mountpoint = path.join(dir, `${tag}.mnt`);
  fs.writeFileSync(mountpoint, '');
  return [
    ['info', ['info', image]],
    ['map', ['map', image]],
    ['check', ['check', image]],
    ['mount', ['mount', image, mountpoint]],
  ];
}

async function expectRefused(args: string[], kind: RegExp): Promise<void> {
  const r = await vdiskBounded(args);
  expect(r.hung, `vdisk ${args.join(' ')} was still running after ${COMMAND_TIMEOUT_MS} ms`).toBe(false);
  expect(r.status).toBe(1);
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^vdisk: error ERR_NOT_A_FILE: /);
  expect(lines[0]).toMatch(kind);
}

describe('an image that is not a regular file', () => {
  it('a FIFO as the image: info, map, check and mount refuse it at once', async () => {
    const fifo = path.join(dir, 'image.fifo');
    sh(`mkfifo ${fifo}`);
    for (const [, args] of commands(fifo, 'fifo')) await expectRefused(args, /image\.fifo is a FIFO/);
    expect(isMounted(path.join(dir, 'fifo.mnt'))).toBe(false);
  });

  it('a FIFO swapped in for the backing file of a qemu-img overlay: info, map, check and mount refuse it', async () => {
    const base = path.join(dir, 'base.raw');
    const overlay = path.join(dir, 'overlay.qcow2');
    fs.writeFileSync(base, Buffer.alloc(1024 * 1024, 0x5a));
    expect(sh(`qemu-img create -q -f qcow2 -b ${base} -F raw ${overlay}`).status).toBe(0);
    fs.rmSync(base);
    sh(`mkfifo ${base}`);
    for (const [, args] of commands(overlay, 'backing')) await expectRefused(args, /base\.raw is a FIFO/);
    expect(isMounted(path.join(dir, 'backing.mnt'))).toBe(false);
  });

  it('a FIFO as a qcow2 backing file: refused the same way', async () => {
    const base = path.join(dir, 'base2.qcow2');
    const overlay = path.join(dir, 'overlay2.qcow2');
    expect(sh(`qemu-img create -q -f qcow2 ${base} 1M && qemu-img create -q -f qcow2 -b ${base} -F qcow2 ${overlay}`).status).toBe(0);
    fs.rmSync(base);
    sh(`mkfifo ${base}`);
    await expectRefused(['info', overlay], /base2\.qcow2 is a FIFO/);
  });

  it('character devices as the image: /dev/zero and /dev/null are refused, also with -f raw', async () => {
    for (const [, args] of commands('/dev/zero', 'zero')) await expectRefused(args, /\/dev\/zero is a character device/);
    await expectRefused(['info', '-f', 'raw', '/dev/null'], /\/dev\/null is a character device/);
    await expectRefused(['map', '-f', 'raw', '/dev/null'], /\/dev\/null is a character device/);
  });

  it('the image fd is left blocking once checked (O_NONBLOCK was only for the open)', async () => {
    const file = path.join(dir, 'plain.raw');
    fs.writeFileSync(file, Buffer.alloc(4096));
    const { fd } = await openRegularFile(file, fs.constants.O_RDWR);
    try {
      const flags = parseInt(/^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);
      expect(flags & fs.constants.O_NONBLOCK).toBe(0);
      expect(flags & 3).toBe(fs.constants.O_RDWR);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('a symlink to a regular file is still an image (backing files often are links)', async () => {
    const base = path.join(dir, 'linked.raw');
    const link = path.join(dir, 'link.raw');
    fs.writeFileSync(base, Buffer.alloc(64 * 1024));
    fs.symlinkSync(base, link);
    const r = await vdiskBounded(['info', link]);
    expect(r.status, r.stderr).toBe(0);
  });
});

describe('an image path that cannot be resolved', () => {
  it('a symlink loop is reported as what it is, not as a missing image', async () => {
    const a = path.join(dir, 'loop-a');
    const b = path.join(dir, 'loop-b');
    fs.symlinkSync(b, a);
    fs.symlinkSync(a, b);
    const r = await vdiskBounded(['info', '-f', 'raw', a]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error EIO: cannot open .*loop-a: ELOOP: too many symbolic links/);
  });
});
