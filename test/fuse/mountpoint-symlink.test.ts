/**
 * A mountpoint that is a symlink, or reached through another user's symlink, is
 * refused: root would otherwise mount the disk over whatever file the link names.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { CLI, MiB, Mount, isMounted, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;
useScratchDir({}, (d) => (dir = d));

/** Every mount point under the scratch directory, from the kernel's own table. */
function mountsUnder(root: string): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((p) => p.startsWith(root));
}

afterAll(() => {
  // Only if a check failed: never leave a mount over a file behind.
  if (dir) for (const p of mountsUnder(dir)) sh(`umount -l ${p}`);
});

/**
 * `vdisk mount ...` until it exits or says it serves (then it is stopped): a
 * mount that wrongly succeeds must not hang the test.
 */
function tryMount(args: string[], cwd: string): Promise<{ status: number | null; stderr: string; served: boolean }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [CLI, 'mount', ...args], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    let served = false;
    proc.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (!served && stderr.includes('vdisk: serving')) {
        served = true;
        for (const p of mountsUnder(dir)) sh(`umount -l ${p}`);
        proc.kill('SIGINT');
      }
    });
    proc.on('close', (status) => resolve({ status, stderr, served }));
  });
}

function image(name: string): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 4 * MiB);
  return file;
}

describe('mountpoint symlinks', () => {
  it('a mountpoint that is a symlink to a secret file is refused, and the secret is not mounted over', async () => {
    const base = fs.mkdtempSync(path.join(dir, 'final-'));
    image(path.relative(dir, path.join(base, 'img')));
    fs.mkdirSync(path.join(base, 'pub'));
    const secret = path.join(base, 'secret.conf');
    fs.writeFileSync(secret, 'password=hunter2\n');
    fs.symlinkSync(secret, path.join(base, 'pub', 'disk'));

    const r = await tryMount(['-r', 'img', 'pub/disk'], base);
    expect(r.served).toBe(false);
    expect(mountsUnder(base)).toEqual([]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error ERR_MOUNTPOINT: mountpoint pub\/disk is a symlink[^\n]*\n$/);
    expect(fs.readFileSync(secret, 'utf8')).toBe('password=hunter2\n');
    // unmount names mounts the same way: the link is not a mount, whatever it points at.
    const u = vdisk(['unmount', path.join(base, 'pub', 'disk')]);
    expect(u.status).toBe(1);
    expect(u.stderr).toMatch(/^vdisk: error ERR_NOT_MOUNTED: /);
  });

  it("a path through another user's symlink is refused", async () => {
    const base = fs.mkdtempSync(path.join(dir, 'parent-'));
    image(path.relative(dir, path.join(base, 'img')));
    fs.mkdirSync(path.join(base, 'victim'));
    const target = path.join(base, 'victim', 'disk');
    fs.writeFileSync(target, 'not yours\n');
    // A link anyone could have made: owned by nobody, pointing into a directory of root's.
    fs.mkdirSync(path.join(base, 'pub'));
    fs.symlinkSync(path.join(base, 'victim'), path.join(base, 'pub', 'dir'));
    fs.lchownSync(path.join(base, 'pub', 'dir'), 65534, 65534);

    const r = await tryMount(['-r', 'img', 'pub/dir/disk'], base);
    expect(r.served).toBe(false);
    expect(mountsUnder(base)).toEqual([]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error ERR_MOUNTPOINT: refusing mountpoint pub\/dir\/disk: its path goes through \S+\/pub\/dir, a symlink owned by uid 65534\n$/);
  });

  it("unmount through another user's symlink is refused and the mount it names stays", async () => {
    const base = fs.mkdtempSync(path.join(dir, 'unmount-'));
    const img = image(path.relative(dir, path.join(base, 'img')));
    fs.mkdirSync(path.join(base, 'victim'));
    const target = path.join(base, 'victim', 'disk');
    const m = await Mount.start(img, target, ['-r']);
    // nobody's link into root's directory: root's `vdisk unmount pub/dir/disk` must not end root's mount.
    fs.mkdirSync(path.join(base, 'pub'));
    fs.symlinkSync(path.join(base, 'victim'), path.join(base, 'pub', 'dir'));
    fs.lchownSync(path.join(base, 'pub', 'dir'), 65534, 65534);
    const u = vdisk(['unmount', path.join(base, 'pub', 'dir', 'disk')]);
    expect(u.stderr).toMatch(/^vdisk: error ERR_MOUNTPOINT: refusing mountpoint \S+\/pub\/dir\/disk: its path goes through \S+\/pub\/dir, a symlink owned by uid 65534\n$/);
    expect(u.status).toBe(1);
    expect(mountsUnder(base)).toEqual([target]);
    expect(vdisk(['unmount', target]).status).toBe(0);
    expect(await m.exited).toBe(0);
  });

  it("mount and unmount agree on a path through the user's own symlinked directory", async () => {
    const base = fs.mkdtempSync(path.join(dir, 'own-'));
    const img = image(path.relative(dir, path.join(base, 'img')));
    fs.mkdirSync(path.join(base, 'real'));
    fs.symlinkSync(path.join(base, 'real'), path.join(base, 'link'));
    const via = path.join(base, 'link', 'disk');
    const m = await Mount.start(img, via, ['-r']);
    expect(mountsUnder(base)).toEqual([path.join(base, 'real', 'disk')]);
    expect(isMounted(via)).toBe(true);
    const u = vdisk(['unmount', via]);
    expect(u.stderr).toBe('');
    expect(u.status).toBe(0);
    expect(await m.exited).toBe(0);
    expect(mountsUnder(base)).toEqual([]);
  });
});
