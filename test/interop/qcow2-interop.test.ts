/**
 * qcow2 interoperability with the real qemu-img/qemu-io, both directions, over a
 * matrix of versions, cluster sizes, extended L2 and refcount widths.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImg, readImage } from '../helpers/image.js';
import { MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';
import { rng, runWorkload } from '../helpers/workload.js';

let dir: string;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils' } }, (d) => (dir = d));

const SIZE = 32 * MiB;

const MATRIX: Array<{ name: string; opts: string; backing: boolean }> = [
  { name: 'v3 64k', opts: 'compat=1.1,cluster_size=64k', backing: true },
  { name: 'v2 64k', opts: 'compat=0.10,cluster_size=64k', backing: true },
  { name: 'v2 4k', opts: 'compat=0.10,cluster_size=4k', backing: false },
  { name: 'v3 512 refcount64', opts: 'compat=1.1,cluster_size=512,refcount_bits=64', backing: false },
  { name: 'v3 4k refcount1', opts: 'compat=1.1,cluster_size=4k,refcount_bits=1', backing: true },
  { name: 'v3 64k extended_l2', opts: 'compat=1.1,cluster_size=64k,extended_l2=on', backing: true },
  { name: 'v3 2M extended_l2', opts: 'compat=1.1,cluster_size=2M,extended_l2=on', backing: false },
  { name: 'v3 2M', opts: 'compat=1.1,cluster_size=2M', backing: true },
];

function makeBase(name: string, seed: number): string {
  const base = path.join(dir, `${name}.base.raw`);
  const data = Buffer.alloc(SIZE);
  const rand = rng(seed);
  // Data in some places, holes elsewhere, so that backing data shows through partially.
  for (let off = 0; off < SIZE; off += MiB) {
    if (rand() < 0.6) for (let i = off; i < off + MiB; i += 4) data.writeUInt32LE((rand() * 2 ** 32) >>> 0, i);
  }
  fs.writeFileSync(base, data);
  return base;
}

describe('qemu writes, vdisk reads', () => {
  it.each(MATRIX)('$name: byte-identical to qemu-img convert -O raw', async ({ name, opts, backing }) => {
    const slug = name.replace(/\W+/g, '-');
    const image = path.join(dir, `${slug}.qemu.qcow2`);
    const base = backing ? makeBase(`${slug}-q`, 7) : null;
    const b = base ? `-b ${base} -F raw` : '';
    qemuImg(`create -q -f qcow2 -o ${opts} ${b} ${image} ${SIZE}`);
    const rand = rng(name.length * 977);
    const cmds: string[] = [];
    for (let i = 0; i < 60; i++) {
      const off = Math.floor(rand() * (SIZE / 512 - 2048)) * 512;
      const len = (1 + Math.floor(rand() * 1024)) * 512;
      const r = rand();
      if (r < 0.6) cmds.push(`-c "write -P ${i + 1} ${off} ${len}"`);
      else if (r < 0.8) cmds.push(`-c "write -z ${off} ${len}"`);
      else if (r < 0.9) cmds.push(`-c "write -z -u ${off} ${len}"`);
      else cmds.push(`-c "discard ${off} ${len}"`);
    }
    const w = sh(`qemu-io -f qcow2 ${cmds.join(' ')} ${image}`);
    expect(w.status, w.stderr).toBe(0);
    const raw = path.join(dir, `${slug}.qemu.raw`);
    qemuImg(`convert -O raw ${image} ${raw}`);
    const ours = await readImage(image);
    expect(ours.equals(fs.readFileSync(raw))).toBe(true);
    // vdisk's own check agrees with qemu's: no errors, no leaks.
    const c = vdisk(['check', '--output', 'json', image]);
    expect(c.status, c.stdout + c.stderr).toBe(0);
    fs.rmSync(raw);
  });
});

describe('vdisk writes through the mount, qemu-img checks and compares', () => {
  it.each(MATRIX)('$name: random writes, zero ranges and punches', async ({ name, opts, backing }) => {
    const slug = name.replace(/\W+/g, '-');
    const image = path.join(dir, `${slug}.vdisk.qcow2`);
    const model = path.join(dir, `${slug}.model.raw`);
    const base = backing ? makeBase(`${slug}-v`, 11) : null;
    const create = vdisk(['create', '-f', 'qcow2', '-o', opts, ...(base ? ['-b', base, '-F', 'raw'] : []), image, String(SIZE)]);
    expect(create.status, create.stderr).toBe(0);
    if (base) fs.copyFileSync(base, model);
    else {
      fs.writeFileSync(model, '');
      fs.truncateSync(model, SIZE);
    }
    const mnt = `${image}.mnt`;
    const m = await Mount.start(image, mnt);
    try {
      await runWorkload(mnt, model, { seed: name.length * 31 + 5, size: SIZE, ops: 150, maxBytes: 300 * 1024 });
      expect(sh(`cmp ${mnt} ${model}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(image);
    const cmp = sh(`qemu-img compare -f qcow2 -F raw ${image} ${model}`);
    expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
  });
});
