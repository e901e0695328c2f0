/** vdisk create -f qcow2 against qemu-img info/check; option errors; bitmaps on first write. */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImg, qemuImgJson, qemuImgMap } from '../helpers/image.js';
import { MiB, Mount, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

interface QemuInfo {
  'virtual-size': number;
  'cluster-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { data: { compat: string; 'refcount-bits': number; 'extended-l2'?: boolean; 'lazy-refcounts'?: boolean } };
}

function qemuInfo(image: string): QemuInfo {
  return qemuImgJson<QemuInfo>(`info ${image}`);
}

describe('vdisk create -f qcow2', () => {
  it.each([
    ['compat=1.1,cluster_size=64k', { compat: '1.1', 'refcount-bits': 16, 'extended-l2': false }, 65536],
    ['compat=0.10,cluster_size=4k', { compat: '0.10', 'refcount-bits': 16 }, 4096],
    ['cluster_size=512,refcount_bits=64', { compat: '1.1', 'refcount-bits': 64 }, 512],
    ['cluster_size=2M,refcount_bits=1,lazy_refcounts=on', { compat: '1.1', 'refcount-bits': 1, 'lazy-refcounts': true }, 2 * MiB],
    ['cluster_size=16k,extended_l2=on', { compat: '1.1', 'extended-l2': true }, 16384],
  ] as const)('-o %s: qemu-img sees what was asked, and the image checks clean', (opts, expected, clusterSize) => {
    const image = path.join(dir, `${opts.replace(/\W+/g, '-')}.qcow2`);
    const r = vdisk(['create', '-f', 'qcow2', '-o', opts, image, '3G']);
    expect(r.status, r.stderr).toBe(0);
    const info = qemuInfo(image);
    expect(info['virtual-size']).toBe(3 * 1024 * MiB);
    expect(info['cluster-size']).toBe(clusterSize);
    expect(info['format-specific'].data).toMatchObject(expected);
    expectQemuClean(image);
  });

  it('records the backing file and its format, and takes the size from it', () => {
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, '');
    fs.truncateSync(base, 5 * MiB);
    const image = path.join(dir, 'over.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', image]).status).toBe(0);
    const info = qemuInfo(image);
    expect(info).toMatchObject({ 'virtual-size': 5 * MiB, 'backing-filename': 'base.raw', 'backing-filename-format': 'raw' });
    expectQemuClean(image);
    const ours = JSON.parse(vdisk(['info', '--output', 'json', image]).stdout) as Record<string, unknown>;
    expect(ours).toMatchObject({ format: 'qcow2', 'virtual-size': 5 * MiB, 'backing-filename': 'base.raw', 'backing-filename-format': 'raw' });
  });

  it('preallocation=metadata maps every cluster and stays sparse', () => {
    const image = path.join(dir, 'prealloc.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=64k', image, '64M']).status).toBe(0);
    expectQemuClean(image);
    const map = qemuImgMap(image);
    expect(map.every((e) => e.present)).toBe(true);
    expect(fs.statSync(image).blocks * 512).toBeLessThan(2 * MiB);
    const zero = path.join(dir, 'zero.raw');
    fs.writeFileSync(zero, '');
    fs.truncateSync(zero, 64 * MiB);
    qemuImg(`compare -f qcow2 -F raw ${image} ${zero}`);
  });

  it.each([
    ['cluster_size=3000', /cluster_size/],
    ['cluster_size=4M', /cluster_size/],
    ['refcount_bits=3', /refcount_bits/],
    ['compat=0.10,extended_l2=on', /compat=0.10/],
    ['extended_l2=on,cluster_size=4k', /16k/],
    ['preallocation=full', /preallocation/],
    ['colour=blue', /unknown -o option/],
  ])('-o %s is refused with a clear message', (opts, message) => {
    const r = vdisk(['create', '-f', 'qcow2', '-o', opts, path.join(dir, 'bad.qcow2'), '1G']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^vdisk: error ERR_USAGE: /);
    expect(r.stderr).toMatch(message);
    expect(fs.existsSync(path.join(dir, 'bad.qcow2'))).toBe(false);
  });

  it('persistent bitmaps are dropped with a warning on the first writable open, and the image stays clean for qemu', async () => {
    const image = path.join(dir, 'bitmaps.qcow2');
    expect(sh(`qemu-img create -q -f qcow2 ${image} 16M && qemu-img bitmap --add ${image} b0 && qemu-io -c "write -P 1 0 1M" ${image}`).status).toBe(0);
    const m = await Mount.start(image, `${image}.mnt`);
    try {
      expect(m.stderr).toMatch(/dropped its persistent dirty bitmaps/);
      expect(sh(`printf x | dd of=${image}.mnt bs=1 seek=${2 * MiB} conv=notrunc,fsync status=none`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expectQemuClean(image);
    const check = sh(`qemu-img check ${image} 2>&1`);
    expect(check.stdout).toMatch(/No errors were found/);
    expect(check.stdout).not.toMatch(/bitmap/);
  });
});
