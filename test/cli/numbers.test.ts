/**
 * Numbers on the command line: each is checked with its unit and range before
 * anything is opened, and a bad one is a usage error (exit 2). A create that
 * fails leaves no file behind, and --force keeps the old file until the new
 * image is complete.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { MiB, sh, vdisk, type RunResult } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({}, (d) => (dir = d));

function expectUsageError(r: RunResult, mentions: string): void {
  expect(r.status, r.stderr).toBe(2);
  expect(r.stderr).toMatch(/^vdisk: error ERR_USAGE: /);
  expect(r.stderr.trim().split('\n')).toHaveLength(1);
  expect(r.stderr).toContain(mentions);
}

/** What is in a directory, for "nothing was left behind" (temp files included). */
function listing(d: string): string[] {
  return fs.readdirSync(d).sort();
}

describe('vdisk create: sizes', () => {
  it('a size must come to whole bytes: 1.5 is refused, 1.5k is 1536 bytes', () => {
    const sub = fs.mkdtempSync(path.join(dir, 'frac-'));
    const r = path.join(sub, 'r.img');
    expectUsageError(vdisk(['create', r, '1.5']), "'1.5'");
    expectUsageError(vdisk(['create', r, '0.3k']), "'0.3k'");
    expectUsageError(vdisk(['create', r, '-5']), "'-5'");
    expectUsageError(vdisk(['create', r, '1E']), "'1E'");
    expectUsageError(vdisk(['create', '-f', 'qcow2', r, '2.5']), "'2.5'");
    expectUsageError(vdisk(['create', '-f', 'qcow2', '-o', 'cluster_size=1.5', r, '1M']), "'1.5'");
    expectUsageError(vdisk(['create', '-f', 'qcow2', '-o', 'refcount_bits=abc', r, '1M']), "'abc'");
    expect(listing(sub)).toEqual([]);
    const ok = vdisk(['create', r, '1.5k']);
    expect(ok.status, ok.stderr).toBe(0);
    expect(fs.statSync(r).size).toBe(1536);
  });

  it('a create the filesystem refuses (7P) leaves no file behind, and --force leaves the old file as it was', () => {
    const sub = fs.mkdtempSync(path.join(dir, 'efbig-'));
    const n = path.join(sub, 'n.img');
    const r = vdisk(['create', n, '7P']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error EFBIG: .*n\.img/);
    expect(listing(sub)).toEqual([]);
    const old = path.join(sub, 'old.img');
    fs.writeFileSync(old, 'precious');
    const f = vdisk(['create', '--force', old, '7P']);
    expect(f.status).toBe(1);
    expect(f.stderr).toMatch(/^vdisk: error EFBIG: /);
    expect(fs.readFileSync(old, 'utf8')).toBe('precious');
    expect(listing(sub)).toEqual(['old.img']);
    // qcow2: refused before anything is written (its L1 table would be too large).
    const q = vdisk(['create', '-f', 'qcow2', '--force', old, '7P']);
    expect(q.status).toBe(2);
    expect(fs.readFileSync(old, 'utf8')).toBe('precious');
    expect(listing(sub)).toEqual(['old.img']);
  });

  it('--force on a symlink replaces the link and never writes through it', () => {
    const sub = fs.mkdtempSync(path.join(dir, 'link-'));
    const victim = path.join(sub, 'victim.conf');
    fs.writeFileSync(victim, 'secret=1\n');
    const link = path.join(sub, 'disk.img');
    fs.symlinkSync(victim, link);
    for (const format of ['raw', 'qcow2']) {
      const r = vdisk(['create', '--force', '-f', format, link, '1M']);
      expect(r.status, r.stderr).toBe(0);
      expect(fs.readFileSync(victim, 'utf8')).toBe('secret=1\n');
      expect(fs.lstatSync(link).isFile()).toBe(true);
      fs.rmSync(link);
      fs.symlinkSync(victim, link);
    }
  });

  describe('on a full filesystem', () => {
    let small: string | undefined;
    afterAll(() => {
      if (small) sh(`umount ${small}`);
    });

    it('a qcow2 create that runs out of space midway leaves no file, and --force keeps the old one whole', () => {
      // A real filesystem that fills up: 256 KiB of tmpfs, and metadata preallocation of
      // 2048 L2 tables of 512 bytes (1 MiB) runs out of space halfway through writing them.
      small = fs.mkdtempSync(path.join(dir, 'small-'));
      const m = sh(`mount -t tmpfs -o size=256k vdisk-test-small ${small}`);
      expect(m.status, m.stderr).toBe(0);
      const image = path.join(small, 'q.qcow2');
      const args = ['create', '-f', 'qcow2', '-o', 'cluster_size=512,preallocation=metadata', image, '64M'];
      const r = vdisk(args);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^vdisk: error ENOSPC: /);
      expect(listing(small)).toEqual([]);
      const old = Buffer.alloc(64 * 1024, 0x5a);
      fs.writeFileSync(image, old);
      const f = vdisk(['create', '--force', ...args.slice(1)]);
      expect(f.status).toBe(1);
      expect(fs.readFileSync(image).equals(old)).toBe(true);
      expect(listing(small)).toEqual(['q.qcow2']);
      // And one that fits replaces it.
      const fits = vdisk(['create', '--force', '-f', 'qcow2', image, `${MiB}`]);
      expect(fits.status, fits.stderr).toBe(0);
      expect(sh(`qemu-img check -q ${image}`).status).toBe(0);
      expect(listing(small)).toEqual(['q.qcow2']);
    });
  });
});

describe('numeric options are usage errors before anything is opened', () => {
  // The image does not exist: an option that got past parsing would fail with ERR_IMAGE_NOT_FOUND instead.
  const missing = () => path.join(dir, 'missing.img');
  const mp = () => {
    const p = path.join(dir, 'numbers-mp');
    if (!fs.existsSync(p)) fs.writeFileSync(p, '');
    return p;
  };

  it.each([
    ['--readahead-kb', '-5'],
    ['--readahead-kb', 'abc'],
    ['--readahead-kb', '1e12'],
    ['--readahead-kb', '2.5'],
    ['--http-retries', '-1'],
    ['--http-retries', 'abc'],
    ['--http-timeout', '0'],
    ['--http-timeout', 'abc'],
    ['--http-timeout', '-3'],
    ['--l2-cache-size', 'lots'],
    ['--inject', 'read:EIO@1.5'],
    ['--inject', 'read:EIO*0'],
    ['--inject', 'read:NOPE'],
  ])('mount %s %s', (option, value) => {
    expectUsageError(vdisk(['mount', missing(), mp(), option, value]), option === '--inject' ? value : `'${value}'`);
  });

  it.each([
    ['info', '--http-timeout', '0'],
    ['map', '--http-retries', 'abc'],
    ['stream', '--http-retries', '-1'],
    ['create', '--http-timeout', '0'],
  ])('%s %s %s', (command, option, value) => {
    const args = command === 'create' ? ['create', '-f', 'qcow2', '-b', missing(), path.join(dir, 'never.qcow2')] : [command, missing()];
    expectUsageError(vdisk([...args, option, value]), `'${value}'`);
    expect(fs.existsSync(path.join(dir, 'never.qcow2'))).toBe(false);
  });

  it('values in range pass the parser (and the missing image is what fails)', () => {
    for (const [option, value] of [
      ['--readahead-kb', '0'],
      ['--readahead-kb', '4096'],
      ['--http-timeout', '0.5'],
      ['--http-retries', '0'],
      ['--l2-cache-size', '1M'],
      ['--inject', 'read:EIO@1M+4k*3'],
    ]) {
      const r = vdisk(['mount', missing(), mp(), option!, value!]);
      expect(r.stderr, `${option} ${value}`).toMatch(/^vdisk: error ERR_IMAGE_NOT_FOUND: /);
    }
  });
});
