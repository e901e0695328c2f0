/**
 * --backing-confine DIR: a backing file that resolves outside DIR (../, an
 * absolute path, a symlink, deeper in the chain) or a URL without
 * --allow-remote is refused by every command that opens a chain, before it is
 * read. Overlays are made by qemu-img, as a user would supply them.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { Nginx } from '../helpers/nginx.js';
import { MiB, isMounted, sh, vdisk, vdiskAsync } from '../helpers/vdisk.js';

let dir: string;
let conf: string;
let nginx: Nginx;
useScratchDir({ tools: { 'qemu-img': 'qemu-utils', nginx: 'nginx-light' } }, (d) => (dir = d));

function ok(command: string): void {
  const r = sh(command);
  expect(r.status, `${command}\n${r.stderr}`).toBe(0);
}

beforeAll(async () => {
  conf = path.join(dir, 'users');
  fs.mkdirSync(conf);
  fs.mkdirSync(path.join(dir, 'www'));
  ok(`head -c ${MiB} /dev/urandom > ${conf}/in.img && head -c ${MiB} /dev/urandom > ${dir}/outside.img && cp ${dir}/outside.img ${dir}/www/remote.img`);
  fs.writeFileSync(path.join(dir, 'hostname'), 'secret-host\n');
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -b in.img -F raw ov-in.qcow2`);
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -b ../outside.img -F raw ov-dotdot.qcow2`);
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -u -b ${dir}/hostname -F raw ov-abs.qcow2 ${MiB}`);
  fs.symlinkSync('../outside.img', path.join(conf, 'link.img'));
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -b link.img -F raw ov-link.qcow2`);
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -b ov-dotdot.qcow2 -F qcow2 ov-chain.qcow2`);
  nginx = await Nginx.start(path.join(dir, 'www'), dir);
  ok(`cd ${conf} && qemu-img create -q -f qcow2 -u -b ${nginx.url('remote.img')} -F raw ov-url.qcow2 ${MiB}`);
});

afterAll(async () => {
  await nginx?.stop();
  if (dir && isMounted(path.join(dir, 'mp'))) sh(`umount -l ${path.join(dir, 'mp')}`);
});

const confined = (...args: string[]) => ['--backing-confine', conf, ...args];

describe('--backing-confine', () => {
  it('opens a chain whose backing files are all inside the directory', () => {
    const r = vdisk(['info', ...confined('--backing-chain', '--output', 'json', path.join(conf, 'ov-in.qcow2'))]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toHaveLength(2);
  });

  it.each([
    ['../outside.img', 'ov-dotdot.qcow2', /backing file \.\.\/outside\.img resolves outside/],
    ['an absolute path', 'ov-abs.qcow2', /backing file \S+\/hostname resolves outside/],
    ['a symlink inside pointing out', 'ov-link.qcow2', /backing file link\.img resolves outside/],
    ['a backing file deeper in the chain', 'ov-chain.qcow2', /ov-dotdot\.qcow2: backing file \.\.\/outside\.img resolves outside/],
  ])('refuses %s in info, map and check', (_what, image, message) => {
    for (const cmd of ['info', 'map', 'check']) {
      const r = vdisk([cmd, ...confined(path.join(conf, image))]);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(new RegExp(`^vdisk: error ERR_BACKING_CONFINED: [^\\n]*${message.source}[^\\n]*\\n$`));
      expect(r.status).toBe(1);
    }
    // Without the option the same chain opens: the option is what refuses it.
    expect(vdisk(['info', path.join(conf, image)]).status).toBe(0);
  });

  it('refuses an outside backing file in mount and stream, before mounting or writing anything', () => {
    const image = path.join(conf, 'ov-dotdot.qcow2');
    const before = fs.readFileSync(image);
    fs.writeFileSync(path.join(dir, 'mp'), '');
    const m = vdisk(['mount', ...confined(image, path.join(dir, 'mp'))]);
    expect(m.stderr).toMatch(/^vdisk: error ERR_BACKING_CONFINED: [^\n]*outside[^\n]*\n$/);
    expect(m.status).toBe(1);
    expect(isMounted(path.join(dir, 'mp'))).toBe(false);
    const s = vdisk(['stream', '--drop-backing', ...confined(image)]);
    expect(s.stderr).toMatch(/^vdisk: error ERR_BACKING_CONFINED: [^\n]*outside[^\n]*\n$/);
    expect(s.status).toBe(1);
    expect(fs.readFileSync(image).equals(before)).toBe(true);
  });

  it('refuses a URL unless --allow-remote', async () => {
    const image = path.join(conf, 'ov-url.qcow2');
    const r = await vdiskAsync(['info', ...confined(image)]);
    expect(r.stderr).toMatch(/^vdisk: error ERR_BACKING_CONFINED: [^\n]*backing file http:\/\/127\.0\.0\.1:\d+\/remote\.img is remote[^\n]*--allow-remote[^\n]*\n$/);
    expect(r.status).toBe(1);
    expect(nginx.bodyBytesSent()).toBe(0);
    const allowed = await vdiskAsync(['info', ...confined('--allow-remote', '--output', 'json', image)]);
    expect(allowed.stderr).toBe('');
    expect(allowed.status).toBe(0);
    expect(JSON.parse(allowed.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': MiB });
  });

  it('a --backing-confine directory that does not exist is a usage error', () => {
    const r = vdisk(['info', '--backing-confine', path.join(dir, 'nope'), path.join(conf, 'ov-in.qcow2')]);
    expect(r.stderr).toMatch(/^vdisk: error ERR_USAGE: --backing-confine: \S+ does not exist\n$/);
    expect(r.status).toBe(2);
  });
});
