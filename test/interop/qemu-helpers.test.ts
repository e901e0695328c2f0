/**
 * The qemu-img helpers the other tests lean on: a qemu-img that fails says why
 * (its exit status and stderr) instead of handing back an empty stdout, and a
 * check that cannot run is never "clean".
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImg, qemuImgCheck, qemuImgInfo, qemuImgMap } from '../helpers/image.js';

let dir: string;

useScratchDir({ fuse: false, tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

describe('qemu-img helpers', () => {
  it('map and info on an image qemu-img cannot open fail with what qemu-img said', () => {
    const missing = path.join(dir, 'missing.qcow2');
    expect(() => qemuImgMap(missing)).toThrow(/exited with 1:[\s\S]*Could not open/);
    expect(() => qemuImgInfo(missing)).toThrow(/exited with 1:[\s\S]*Could not open/);
    expect(() => qemuImg(`convert -O raw ${missing} ${missing}.raw`)).toThrow(/Could not open/);
  });

  it('check: an image it cannot open is not clean, a corrupt one is counted, a good one is clean', () => {
    const good = path.join(dir, 'good.qcow2');
    qemuImg(`create -q -f qcow2 ${good} 8M`);
    expectQemuClean(good);
    // A header cut short: qemu-img cannot open it (exit 1, no JSON on stdout).
    const bad = path.join(dir, 'bad.qcow2');
    fs.writeFileSync(bad, fs.readFileSync(good).subarray(0, 50));
    expect(() => qemuImgCheck(bad)).toThrow(/exited with 1:[\s\S]*qemu-img: /);
    expect(() => expectQemuClean(bad)).toThrow(/exited with 1/);
    // A raw file: "does not support checks" (exit 63) is no clean bill either.
    const raw = path.join(dir, 'plain.raw');
    fs.writeFileSync(raw, Buffer.alloc(4096));
    expect(() => expectQemuClean(raw)).toThrow(/exited with 63:[\s\S]*does not support checks/);
    // The first refcount block moved far outside the file: corruptions, exit status 2.
    const b = fs.readFileSync(good);
    b.writeBigUInt64BE(1n << 50n, Number(b.readBigUInt64BE(48)));
    const corrupt = path.join(dir, 'corrupt.qcow2');
    fs.writeFileSync(corrupt, b);
    const c = qemuImgCheck(corrupt);
    expect(c.status).toBe(2);
    expect(c.corruptions).toBeGreaterThan(0);
    expect(() => expectQemuClean(corrupt)).toThrow();
  });
});
