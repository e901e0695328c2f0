/**
 * The control socket cannot be hijacked by another user: a socket directory
 * she pre-created (mode 0777, or her own) is refused by the mount and by the
 * client, and a socket she serves is not trusted (SO_PEERCRED).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlSocketPath } from '../../src/export/control.js';
import { useScratchDir } from '../helpers/env.js';
import { MiB, Mount, isMounted, sh, vdisk } from '../helpers/vdisk.js';

const NOBODY = 65534;
let dir: string;
useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => {
  dir = d;
  // Let uid 65534 reach the directory it gets below (and nothing else: no read).
  fs.chmodSync(dir, 0o711);
});

const savedXdg = process.env['XDG_RUNTIME_DIR'];
const fakes: ChildProcess[] = [];
afterEach(() => {
  if (savedXdg === undefined) delete process.env['XDG_RUNTIME_DIR'];
  else process.env['XDG_RUNTIME_DIR'] = savedXdg;
  for (const f of fakes.splice(0)) f.kill();
});
afterAll(() => {
  if (dir) for (const f of fs.readdirSync(dir)) if (isMounted(path.join(dir, f))) sh(`umount -l ${path.join(dir, f)}`);
});

function ok(command: string): void {
  const r = sh(command);
  expect(r.status, `${command}\n${r.stderr}`).toBe(0);
}

/** A qcow2 overlay on a raw base; the run directory the commands see as $XDG_RUNTIME_DIR. */
function setup(name: string): { overlay: string; run: string } {
  const base = path.join(dir, `${name}-base.raw`);
  const overlay = path.join(dir, `${name}.qcow2`);
  ok(`head -c ${MiB} /dev/urandom > ${base} && qemu-img create -q -f qcow2 -b ${base} -F raw ${overlay}`);
  const run = path.join(dir, `${name}-run`);
  fs.mkdirSync(run, { mode: 0o700 });
  process.env['XDG_RUNTIME_DIR'] = run;
  return { overlay, run };
}

/**
 * A control server run as uid 65534 that answers any request with "done,
 * backing dropped", listening in a directory of its own; resolves with its
 * socket's path once it listens.
 */
async function fakeServer(name: string): Promise<string> {
  const own = path.join(dir, `${name}-nobody`);
  fs.mkdirSync(own, { mode: 0o700 });
  fs.chownSync(own, NOBODY, NOBODY);
  const sock = path.join(own, 'fake.sock');
  const script = `
    const net = require('node:net');
    net.createServer((s) => s.once('data', () => s.end(JSON.stringify({ type: 'done', done: 1, total: 1, copied: 1, droppedBacking: true, interrupted: false }) + '\\n')))
      .listen(process.argv[1], () => console.log('listening'));`;
  const proc = spawn(process.execPath, ['-e', script, sock], { cwd: '/', uid: NOBODY, gid: NOBODY, stdio: ['ignore', 'pipe', 'inherit'] });
  fakes.push(proc);
  await new Promise<void>((resolve, reject) => {
    proc.stdout!.once('data', () => resolve());
    proc.once('exit', (code) => reject(new Error(`fake server exited with ${code}`)));
  });
  return sock;
}

function backingOf(image: string): string | undefined {
  const info = JSON.parse(sh(`qemu-img info --output=json ${image}`).stdout) as { 'backing-filename'?: string };
  return info['backing-filename'];
}

describe('control socket', () => {
  it('a mount makes its socket 0600 in a 0700 directory, and vdisk stream reaches it there', async () => {
    const { overlay, run } = setup('own');
    const mnt = path.join(dir, 'own');
    const m = await Mount.start(overlay, mnt);
    expect(m.stderr).not.toMatch(/control socket/);
    const sockDir = path.join(run, 'vdisk');
    expect(fs.statSync(sockDir).mode & 0o7777).toBe(0o700);
    const sock = controlSocketPath(fs.realpathSync(overlay), sockDir);
    expect(fs.statSync(sock).isSocket()).toBe(true);
    expect(fs.statSync(sock).mode & 0o7777).toBe(0o600);
    const r = vdisk(['stream', '--output', 'json', overlay]);
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toMatchObject({ interrupted: false, done: MiB });
    expect(await m.stop()).toBe(0);
  });

  it.each([
    ['mode 0777', (d: string) => fs.chmodSync(d, 0o777), /vdisk is writable by others \(mode 0777\)/],
    ['owned by another user', (d: string) => fs.chownSync(d, NOBODY, NOBODY), /vdisk is owned by uid 65534/],
  ])('a socket directory pre-created %s is refused by the mount: no socket lands there', async (what, spoil, reason) => {
    const { overlay, run } = setup(`hostile-${what.replace(/\W+/g, '-')}`);
    const sockDir = path.join(run, 'vdisk');
    fs.mkdirSync(sockDir);
    spoil(sockDir);
    const mnt = path.join(dir, `hostile-${what.replace(/\W+/g, '-')}`);
    const m = await Mount.start(overlay, mnt);
    expect(m.stderr).toMatch(/vdisk: warning: no control socket \(ERR_UNSAFE_PATH: /);
    expect(m.stderr).toMatch(reason);
    expect(fs.readdirSync(sockDir)).toEqual([]);
    expect(await m.stop()).toBe(0);
  });

  it("vdisk stream refuses a hostile directory holding another user's socket, and the image keeps its backing", async () => {
    const { overlay, run } = setup('client-dir');
    const fake = await fakeServer('client-dir');
    const sockDir = path.join(run, 'vdisk');
    fs.mkdirSync(sockDir);
    fs.chmodSync(sockDir, 0o777);
    fs.renameSync(fake, controlSocketPath(fs.realpathSync(overlay), sockDir));
    const r = vdisk(['stream', '--drop-backing', overlay]);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^vdisk: error ERR_UNSAFE_PATH: \S+\/vdisk is writable by others[^\n]*\n$/);
    expect(r.status).toBe(1);
    expect(backingOf(overlay)).toMatch(/client-dir-base\.raw$/);
  });

  it('vdisk stream does not trust a socket served by another uid (SO_PEERCRED), even in a private directory', async () => {
    const { overlay, run } = setup('peer');
    const fake = await fakeServer('peer');
    const sockDir = path.join(run, 'vdisk');
    fs.mkdirSync(sockDir, { mode: 0o700 });
    // As if she had won a race for the name: her socket where the mount's should be.
    fs.renameSync(fake, controlSocketPath(fs.realpathSync(overlay), sockDir));
    const r = vdisk(['stream', '--drop-backing', overlay]);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^vdisk: error ERR_CONTROL_PEER: \S+\.sock is served by uid 65534 \(pid \d+\), not by uid 0 or root[^\n]*\n$/);
    expect(r.status).toBe(1);
    expect(backingOf(overlay)).toMatch(/peer-base\.raw$/);
  });
});
