/** Bad input gets one line with a code and a non-zero exit, never a stack trace or a hang. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { Mount, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({}, (d) => (dir = d));

function expectOneLineError(r: { status: number | null; stderr: string }, code: string): void {
  expect(r.status).not.toBe(0);
  expect(r.stderr).toMatch(new RegExp(`^vdisk: error ${code}: `));
  expect(r.stderr.trim().split('\n')).toHaveLength(1);
  expect(r.stderr).not.toMatch(/\bat .*\.js:\d+/);
}

describe('vdisk bad input', () => {
  it('a missing image', () => {
    fs.writeFileSync(path.join(dir, 'mp'), '');
    expectOneLineError(vdisk(['mount', path.join(dir, 'nope.img'), path.join(dir, 'mp')]), 'ERR_IMAGE_NOT_FOUND');
  });

  it('a mountpoint that is a directory, or missing', () => {
    const img = path.join(dir, 'a.img');
    fs.writeFileSync(img, Buffer.alloc(4096));
    expectOneLineError(vdisk(['mount', img, dir]), 'ERR_MOUNTPOINT');
    expectOneLineError(vdisk(['mount', img, path.join(dir, 'missing')]), 'ERR_MOUNTPOINT');
  });

  it('an already mounted path', async () => {
    const img = path.join(dir, 'b.img');
    fs.writeFileSync(img, Buffer.alloc(4096));
    const mp = path.join(dir, 'b');
    const m = await Mount.start(img, mp);
    try {
      expectOneLineError(vdisk(['mount', img, mp]), 'ERR_ALREADY_MOUNTED');
    } finally {
      expect(await m.stop()).toBe(0);
    }
  });

  it('bad options and a missing command', () => {
    const img = path.join(dir, 'c.img');
    fs.writeFileSync(img, Buffer.alloc(4096));
    const mp = path.join(dir, 'c-mp');
    fs.writeFileSync(mp, '');
    expectOneLineError(vdisk(['mount', img, mp, '--discard', 'sometimes']), 'ERR_USAGE');
    expectOneLineError(vdisk(['mount', img, mp, '--inject', 'read:NOPE']), 'ERR_USAGE');
    // Options are checked before anything is opened: a bad rule is named even when the image is missing.
    expectOneLineError(vdisk(['mount', path.join(dir, 'nope.img'), mp, '--inject', 'read:NOPE']), 'ERR_USAGE');
    expectOneLineError(vdisk(['mount', img]), 'ERR_USAGE');
    expectOneLineError(vdisk([]), 'ERR_USAGE');
    expectOneLineError(vdisk(['create', path.join(dir, 'd.img'), '12 parsecs']), 'ERR_USAGE');
  });

  it('an unsupported format is named, not probed into garbage', () => {
    const img = path.join(dir, 'q.qed');
    expect(sh(`qemu-img create -q -f qed ${img} 1M`).status).toBe(0);
    expectOneLineError(vdisk(['info', img]), 'ERR_IMAGE_FORMAT');
  });

  it('create refuses to overwrite; info and map describe a raw image in JSON', () => {
    const img = path.join(dir, 'e.img');
    expect(vdisk(['create', img, '8M']).status).toBe(0);
    expectOneLineError(vdisk(['create', img, '8M']), 'EEXIST');
    expect(sh(`printf data | dd of=${img} bs=4096 seek=256 conv=notrunc status=none`).status).toBe(0);
    const info = JSON.parse(vdisk(['info', '--output', 'json', img]).stdout);
    expect(info).toMatchObject({ format: 'raw', 'virtual-size': 8 * 1024 * 1024 });
    const map = JSON.parse(vdisk(['map', '--output', 'json', img]).stdout) as Array<{ start: number; length: number; data: boolean }>;
    expect(map.filter((e) => e.data)).toEqual([expect.objectContaining({ start: 1024 * 1024, data: true })]);
    expect(map.reduce((n, e) => n + e.length, 0)).toBe(8 * 1024 * 1024);
  });

  it('--help explains each command', () => {
    const r = vdisk(['mount', '--help']);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/--discard/);
    expect(r.stdout).toMatch(/--detect-zeroes/);
    expect(r.stdout).toMatch(/regular file/);
  });
});
