/**
 * Cost stays bounded on any qcow2 image: memory follows the image's real
 * metadata (not how often it is referenced, nor the file's apparent size, nor
 * the virtual size), and a compressed cluster cannot make the decoder
 * allocate more than a cluster's worth. Bounds are generous (several times
 * what the code needs) and the old code missed each by an order of magnitude
 * or more; no test asserts a speed.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean } from '../helpers/image.js';
import { extendedImage, sharedL2Image, vdiskMeasured, zstdWindowImage } from '../helpers/qcow2-hostile.js';
import { Mount, sh } from '../helpers/vdisk.js';

let dir: string;

useScratchDir({ tools: { 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', python3: 'python3' } }, (d) => (dir = d));

const MB = 1024 * 1024;

/** Peak resident set of a live process, from /proc. */
function peakRss(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

/** Start a mount with a capped V8 heap, so that a run-away path dies early instead of eating the machine. */
async function mountCapped(image: string, mp: string, args: string[]): Promise<Mount> {
  const old = process.env.NODE_OPTIONS;
  process.env.NODE_OPTIONS = `${old ?? ''} --max-old-space-size=256`;
  try {
    return await Mount.start(image, mp, args);
  } finally {
    if (old === undefined) delete process.env.NODE_OPTIONS;
    else process.env.NODE_OPTIONS = old;
  }
}

describe('qcow2 check: memory bounded by the metadata, not by references', () => {
  it('check of a 4M-entry L1 naming one L2 table everywhere stays small and reports the overflow', () => {
    const image = sharedL2Image(dir);
    const r = vdiskMeasured(['check', image]);
    expect(r.status, r.stderr.slice(-2000)).toBe(2);
    expect(r.stdout).toMatch(/referenced 4194304 times, more than 16-bit refcounts can count/);
    expect(r.maxRss, `peak RSS ${r.maxRss}`).toBeLessThan(400 * MB);
  });

  it('a writable mount of it with the dirty bit rebuilds refcounts in bounded memory', async () => {
    const image = sharedL2Image(dir, true);
    const mp = path.join(dir, 'dirty-mp');
    const m = await mountCapped(image, mp, ['-f', 'qcow2']);
    try {
      expect(m.stderr).toMatch(/dirty bit/);
      expect(peakRss(m.proc.pid!), 'peak RSS of the mount').toBeLessThan(400 * MB);
      const first = sh(`dd if=${mp} bs=512 count=1 status=none | od -An -tx1 | head -1`);
      expect(first.stdout).toMatch(/^ 11 11 11/);
    } finally {
      await m.stop();
    }
  });

  it('check of a 512-byte-cluster image extended to 1 TiB scans what the metadata references, not the file size', () => {
    const image = extendedImage(dir, '1T');
    // The old scan went through 2^31 clusters one await at a time (hours); the timeout is generous.
    const r = vdiskMeasured(['check', '--output', 'json', image], { timeoutMs: 60_000 });
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    const j = JSON.parse(r.stdout) as { corruptions: number; leaks: number; 'image-end-offset': number; 'allocated-clusters': number };
    expect({ corruptions: j.corruptions, leaks: j.leaks }).toEqual({ corruptions: 0, leaks: 0 });
    // Everything in use lies in the first few MiB, whatever the file's apparent size.
    expect(j['image-end-offset']).toBeLessThan(8 * MB);
    expect(j['allocated-clusters']).toBeGreaterThan(512);
  });
});

describe('qcow2 zstd: a frame cannot declare its way to gigabytes', () => {
  it('a cluster whose frame declares a 1.875 GiB window is EIO, and the mount stays small', async () => {
    const image = zstdWindowImage(dir);
    const mp = path.join(dir, 'zstd-mp');
    const m = await mountCapped(image, mp, ['-r']);
    try {
      const r = sh(`dd if=${mp} of=/dev/null bs=64k count=1 iflag=direct status=none`);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/Input\/output error/);
      // Clusters that are not hostile still read.
      const rest = sh(`dd if=${mp} bs=64k skip=1 count=1 status=none | od -An -tx1 | head -1`);
      expect(rest.stdout).toMatch(/^ 5a 5a/);
      expect(peakRss(m.proc.pid!), 'peak RSS of the mount').toBeLessThan(400 * MB);
    } finally {
      await m.stop();
    }
    expect(m.stderr).toMatch(/read failed: qcow2: compressed cluster at \d+ does not decompress: zstd frame declares a 2013265920-byte window/);
  });
});

describe('qcow2 map and SEEK_DATA: cost follows allocated metadata, not virtual size', () => {
  it('map of a 256 TiB image with one cluster of data at its end', () => {
    const image = path.join(dir, 'huge.qcow2');
    expect(sh(`qemu-img create -q -f qcow2 ${image} 256T`).status).toBe(0);
    expect(sh(`qemu-io -c "write -P 0x44 255T 64k" ${image}`).status).toBe(0);
    // The old code asked for 64 clusters at a time: 64M calls (minutes); the timeout is generous.
    const r = vdiskMeasured(['map', '--output', 'json', image], { timeoutMs: 60_000 });
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    const ours = JSON.parse(r.stdout) as Array<{ start: number; length: number; data: boolean }>;
    const theirs = JSON.parse(sh(`qemu-img map --output=json ${image}`).stdout) as Array<{ start: number; length: number; data: boolean }>;
    const pick = (l: typeof ours) => l.map((e) => ({ start: e.start, length: e.length, data: e.data }));
    expect(pick(ours)).toEqual(pick(theirs));
  });

  it('SEEK_DATA on a mounted 256 TiB image finds the data at its end', async () => {
    const image = path.join(dir, 'huge-seek.qcow2');
    expect(sh(`qemu-img create -q -f qcow2 ${image} 256T`).status).toBe(0);
    expect(sh(`qemu-io -c "write -P 0x44 255T 64k" ${image}`).status).toBe(0);
    const mp = path.join(dir, 'seek-mp');
    const m = await Mount.start(image, mp, ['-r']);
    let answered = false;
    try {
      const py = `import os; fd = os.open('${mp}', os.O_RDONLY); d = os.lseek(fd, 0, os.SEEK_DATA); h = os.lseek(fd, d, os.SEEK_HOLE); print(d, h)`;
      // The old code walked 64 clusters per step (minutes); the timeout is generous.
      const r = sh(`timeout 60 python3 -c "${py}"`);
      expect(r.status, r.stderr).toBe(0);
      answered = true;
      expect(r.stdout.trim()).toBe(`${255 * 2 ** 40} ${255 * 2 ** 40 + 65536}`);
    } finally {
      // A server still busy with the lseek would not stop on Ctrl-C for minutes.
      if (!answered) {
        m.proc.kill('SIGKILL');
        sh(`fusermount3 -u -z ${mp}`);
      }
      await m.stop();
    }
  });
});

describe('qcow2 create: preallocation=metadata writes tables in bounded batches', () => {
  it('create -o preallocation=metadata of 2T stays small and qemu-img finds it clean', () => {
    const image = path.join(dir, 'prealloc.qcow2');
    const r = vdiskMeasured(['create', '-f', 'qcow2', '-o', 'preallocation=metadata', image, '2T']);
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    expect(r.maxRss, `peak RSS ${r.maxRss}`).toBeLessThan(200 * MB);
    expectQemuClean(image);
    const map = JSON.parse(sh(`qemu-img map --output=json ${image}`).stdout) as Array<{ start: number; length: number; data: boolean; offset?: number }>;
    expect(map[0]).toMatchObject({ start: 0, data: true });
    expect(map.reduce((n, e) => n + e.length, 0)).toBe(2 * 2 ** 40);
    fs.rmSync(image);
  });
});

