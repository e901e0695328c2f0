/**
 * Remote images over HTTP, through real mounts: nginx for the well-behaved case,
 * and a fault-injecting server for the rest. Reads either return the right data
 * or fail with EIO and a clear message; nothing hangs.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { FaultServer, type Fault } from '../helpers/fault-server.js';
import { Nginx } from '../helpers/nginx.js';
import { MiB, Mount, sh, shAsync, vdisk, vdiskAsync } from '../helpers/vdisk.js';
import { seededData } from '../helpers/workload.js';
import { HttpDriver } from '../../src/drivers/http/index.js';
import { expectQemuClean, qemuImgMap } from '../helpers/image.js';

let dir: string;
let nginx: Nginx;
const SIZE = 16 * MiB;
let data: Buffer;

useScratchDir({ tools: { nginx: 'nginx-light', 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

beforeAll(async () => {
  data = seededData(SIZE, 42);
  data.fill(0, 4 * MiB, 6 * MiB); // a zero stretch: copy-on-read makes zero clusters of it
  fs.mkdirSync(path.join(dir, 'www'));
  fs.writeFileSync(path.join(dir, 'www', 'disk.raw'), data);
  nginx = await Nginx.start(path.join(dir, 'www'), dir);
});

afterAll(async () => {
  await nginx?.stop();
});

async function read(file: string, offset: number, bytes: number, direct = false): Promise<Buffer> {
  const r = await shAsync(`dd if=${file} bs=4096 iflag=skip_bytes,count_bytes${direct ? ',direct' : ''} skip=${offset} count=${bytes} status=none | base64 -w0`);
  return Buffer.from(r.stdout, 'base64');
}

async function overlayOn(url: string, name: string, extra: string[] = [], createExtra: string[] = []): Promise<{ image: string; m: Mount; mnt: string }> {
  const image = path.join(dir, `${name}.qcow2`);
  const c = await vdiskAsync(['create', '-f', 'qcow2', '-b', url, '-F', 'raw', ...createExtra, image]);
  expect(c.status, c.stderr).toBe(0);
  const mnt = `${image}.mnt`;
  return { image, mnt, m: await Mount.start(image, mnt, extra) };
}

describe('HTTP backing with nginx', () => {
  it('copy-on-read: two full reads cost the server about one image, and the overlay then stands alone', async () => {
    const before = nginx.bodyBytesSent();
    const { image, m, mnt } = await overlayOn(nginx.url('disk.raw'), 'cor', ['--copy-on-read', '--stats']);
    try {
      expect(m.stderr).toMatch(/copy-on-read/);
      expect(sh(`cmp ${mnt} ${path.join(dir, 'www', 'disk.raw')}`).status).toBe(0);
      expect(sh(`dd if=${mnt} iflag=nocache count=0 status=none && cmp ${mnt} ${path.join(dir, 'www', 'disk.raw')}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    const sent = nginx.bodyBytesSent() - before;
    expect(sent).toBeGreaterThanOrEqual(SIZE - 2 * MiB); // the zero stretch may be skipped... or not
    expect(sent).toBeLessThanOrEqual(SIZE * 1.05);
    // Every block was copied into the overlay once: all of the image but the zero stretch,
    // which may go in as zero clusters (no bytes) or as data.
    const copied = Number(/bytesCopied=(\d+)/.exec(m.stderr)?.[1]);
    expect(copied, m.stderr).toBeGreaterThanOrEqual(SIZE - 2 * MiB);
    expect(copied, m.stderr).toBeLessThanOrEqual(SIZE);
    // Everything is in the overlay now: with the backing gone it still reads the same.
    const map = qemuImgMap(image);
    expect(map.every((e) => e.depth === 0)).toBe(true);
    expect(map.some((e) => e.zero && e.start <= 4 * MiB)).toBe(true);
    expectQemuClean(image);
  });

  it('copy-on-read mounts default to direct I/O (no second page cache); --no-direct-io keeps the page cache', async () => {
    // Observable from outside: a FUSE file opened for direct I/O refuses a shared mapping (ENODEV).
    const mapShared = (file: string) =>
      sh(`python3 -c 'import mmap,sys; f=open(sys.argv[1],"rb"); m=mmap.mmap(f.fileno(),65536,mmap.MAP_SHARED,mmap.PROT_READ); sys.stdout.write(m[:4].hex())' ${file}`);
    const expected = data.subarray(0, 4).toString('hex');
    const direct = await overlayOn(nginx.url('disk.raw'), 'cor-direct', ['--copy-on-read']);
    try {
      expect(direct.m.stderr).toMatch(/copy-on-read: .*direct I\/O/);
      const r = mapShared(direct.mnt);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/No such device/);
      expect((await read(direct.mnt, 0, 4)).toString('hex')).toBe(expected);
    } finally {
      expect(await direct.m.stop()).toBe(0);
    }
    const cached = await overlayOn(nginx.url('disk.raw'), 'cor-cached', ['--copy-on-read', '--no-direct-io']);
    try {
      expect(cached.m.stderr).toMatch(/copy-on-read: .*page cache on/);
      const r = mapShared(cached.mnt);
      expect(r.stderr).toBe('');
      expect(r.stdout).toBe(expected);
    } finally {
      expect(await cached.m.stop()).toBe(0);
    }
  });

  it('reading one 4 KiB block fetches no more than the first readahead window', async () => {
    const { m, mnt } = await overlayOn(nginx.url('disk.raw'), 'one-block', ['--copy-on-read']);
    try {
      const before = nginx.bodyBytesSent();
      const block = await read(mnt, 10 * MiB, 4096, true);
      expect(block.equals(data.subarray(10 * MiB, 10 * MiB + 4096))).toBe(true);
      const sent = nginx.bodyBytesSent() - before;
      expect(sent).toBeGreaterThan(0);
      expect(sent).toBeLessThanOrEqual(128 * 1024);
    } finally {
      expect(await m.stop()).toBe(0);
    }
  });

  it('a raw image over HTTP mounts read-only by itself, and create records the URL as backing file', async () => {
    const mnt = path.join(dir, 'direct.mnt');
    const m = await Mount.start(nginx.url('disk.raw'), mnt);
    try {
      expect(m.stderr).toMatch(/read-only/);
      expect(sh(`cmp ${mnt} ${path.join(dir, 'www', 'disk.raw')}`).status).toBe(0);
      expect(sh(`printf x | dd of=${mnt} conv=notrunc status=none`).status).not.toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    const image = path.join(dir, 'url-backing.qcow2');
    expect(vdisk(['create', '-f', 'qcow2', '-b', nginx.url('disk.raw'), '-F', 'raw', image]).status).toBe(0);
    const info = JSON.parse(vdisk(['info', '--output', 'json', '--backing-chain', image]).stdout) as Array<Record<string, unknown>>;
    expect(info[0]).toMatchObject({ 'backing-filename': nginx.url('disk.raw'), 'backing-filename-format': 'raw' });
  });

  it('copy_on_read=on stored in the image is the default, --no-copy-on-read turns it off, qemu-img check accepts the image', async () => {
    const { image, m, mnt } = await overlayOn(nginx.url('disk.raw'), 'cor-default', ['--stats'], ['-o', 'copy_on_read=on']);
    try {
      await read(mnt, 0, 65536, true);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/bytesCopied=65536/);
    expectQemuClean(image);
    const m2 = await Mount.start(image, `${image}.mnt`, ['--no-copy-on-read', '--stats']);
    try {
      await read(`${image}.mnt`, MiB, 65536, true);
    } finally {
      expect(await m2.stop()).toBe(0);
    }
    expect(m2.stderr).toMatch(/bytesCopied=0 /);
  });
});

describe('HTTP backing with a misbehaving server', () => {
  async function withServer(fault: Fault, times: number, fn: (url: string, srv: FaultServer) => Promise<void>): Promise<void> {
    const srv = new FaultServer({ data, fault, times });
    const url = await srv.start();
    try {
      await fn(url, srv);
    } finally {
      await srv.stop();
    }
  }

  it.each([
    ['drop-mid-body', 2],
    ['503', 3],
    ['stall', 1],
    ['no-head', 0],
  ] as const)('%s: reads retry and return the right data', async (fault, times) => {
    await withServer(fault, times, async (url) => {
      const { m, mnt } = await overlayOn(url, `fault-${fault}`, ['--http-timeout', '1', '--http-retries', '4']);
      try {
        expect((await read(mnt, 3 * MiB, 256 * 1024)).equals(data.subarray(3 * MiB, 3 * MiB + 256 * 1024))).toBe(true);
      } finally {
        expect(await m.stop()).toBe(0);
      }
    });
  });

  it('a retry after a dropped connection asks only for the bytes that had not arrived', async () => {
    await withServer('drop-mid-body', 2, async (url, srv) => {
      // The URL mounted by itself, one direct 128 KiB read: one range, no readahead beside it.
      const mnt = path.join(dir, 'fault-resume.mnt');
      const m = await Mount.start(url, mnt, ['--http-timeout', '1', '--http-retries', '4', '--direct-io']);
      try {
        const r = await shAsync(`dd if=${mnt} bs=128k skip=40 count=1 iflag=direct status=none | base64 -w0`);
        expect(Buffer.from(r.stdout, 'base64').equals(data.subarray(5 * MiB, 5 * MiB + 128 * 1024))).toBe(true);
      } finally {
        expect(await m.stop()).toBe(0);
      }
      // The open's one-byte probe, then: each GET is cut halfway; each retry starts where the previous one was cut.
      expect(srv.gets[0]).toEqual([0, 0]);
      expect(srv.gets.slice(1)).toEqual([
        [5 * MiB, 5 * MiB + 128 * 1024 - 1],
        [5 * MiB + 64 * 1024, 5 * MiB + 128 * 1024 - 1],
        [5 * MiB + 96 * 1024, 5 * MiB + 128 * 1024 - 1],
      ]);
    });
  });

  it('a read is answered once its own bytes arrived, while the rest of the range is still on its way', async () => {
    await withServer('hold-rest', 1, async (url, srv) => {
      const { m, mnt } = await overlayOn(url, 'fault-hold', ['--direct-io']);
      try {
        // The GET covers at least the minimum readahead window (128 KiB); its first half arrives, the rest is held.
        expect((await read(mnt, 7 * MiB, 4096, true)).equals(data.subarray(7 * MiB, 7 * MiB + 4096))).toBe(true);
        expect(srv.held.length).toBe(1);
        srv.release();
      } finally {
        expect(await m.stop()).toBe(0);
      }
    });
  });

  it('a server that keeps failing gives EIO with a clear message, within the retry budget', async () => {
    await withServer('503', Infinity, async (url) => {
      const { m, mnt } = await overlayOn(url, 'fault-always', ['--http-retries', '2', '--direct-io']);
      try {
        const r = await shAsync(`dd if=${mnt} of=/dev/null bs=64k count=1 skip=40 iflag=direct status=none`);
        expect(r.status).not.toBe(0);
        expect(r.stderr).toMatch(/Input\/output error/);
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expect(m.stderr).toMatch(/failed after 3 attempts: HTTP 503/);
    });
  });

  it('a remote file that changes after open fails reads with EIO, never mixing data', async () => {
    await withServer('none', 0, async (url, srv) => {
      const { m, mnt } = await overlayOn(url, 'changed', ['--direct-io']);
      try {
        expect((await read(mnt, 0, 65536, true)).equals(data.subarray(0, 65536))).toBe(true);
        srv.change();
        const r = await shAsync(`dd if=${mnt} of=/dev/null bs=64k count=1 skip=100 iflag=direct status=none`);
        expect(r.stderr).toMatch(/Input\/output error/);
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expect(m.stderr).toMatch(/remote image changed since it was opened/);
    });
  });

  it('a weak ETag is not used as If-Range (a strict server would answer 200 to every read): Last-Modified is', async () => {
    const srv = new FaultServer({ data, weakEtag: true });
    const url = await srv.start();
    try {
      const { m, mnt } = await overlayOn(url, 'weak-etag', ['--direct-io']);
      try {
        expect((await read(mnt, 3 * MiB, 256 * 1024, true)).equals(data.subarray(3 * MiB, 3 * MiB + 256 * 1024))).toBe(true);
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expect(srv.gets.length).toBeGreaterThan(1);
    } finally {
      await srv.stop();
    }
  });

  it('a server that ignores Range is refused at open, without downloading the image', async () => {
    await withServer('ignore-range', Infinity, async (url, srv) => {
      const r = await vdiskAsync(['create', '-f', 'qcow2', '-b', url, '-F', 'raw', path.join(dir, 'norange.qcow2')]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^vdisk: error ERR_HTTP_NO_RANGES: /);
      expect(srv.bytesSent).toBeLessThan(SIZE);
    });
  });

  it('a dead server is a clear error, not a hang', async () => {
    const srv = new FaultServer({ data });
    const url = await srv.start();
    await srv.stop();
    const r = await vdiskAsync(['create', '-f', 'qcow2', '-b', url, '-F', 'raw', '--http-retries', '1', path.join(dir, 'dead.qcow2')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error EIO: .*failed after 2 attempts/);
  });

  it('credentials in the URL are sent, but never printed', async () => {
    const srv = new FaultServer({ data, auth: `Basic ${Buffer.from('alice:s3cret').toString('base64')}`, redirect: true });
    const url = (await srv.start()).replace('http://', 'http://alice:s3cret@').replace('/image', '/redirect');
    try {
      const image = path.join(dir, 'auth.qcow2');
      const c = await vdiskAsync(['create', '-f', 'qcow2', '-b', url, '-F', 'raw', image]);
      expect(c.status, c.stderr).toBe(0);
      expect(c.stdout + c.stderr).not.toMatch(/s3cret/);
      const m = await Mount.start(image, `${image}.mnt`, ['--stats']);
      try {
        expect((await read(`${image}.mnt`, 0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
      } finally {
        expect(await m.stop()).toBe(0);
      }
      expect(m.stderr).not.toMatch(/s3cret/);
      expect((await vdiskAsync(['info', image])).stdout).not.toMatch(/s3cret/);
      expect(srv.seenAuth.length).toBeGreaterThan(0);
    } finally {
      await srv.stop();
    }
  });
});

describe('HTTP driver readahead and cache', () => {
  it('a readahead window larger than the cache never fetches a byte twice on a sequential read', async () => {
    // The cache holds less than one window: ranges still being read must not be the ones it forgets.
    const drv = await HttpDriver.open(nginx.url('disk.raw'), { cacheBytes: 256 * 1024, readaheadMaxBytes: 2 * MiB });
    try {
      const buf = Buffer.alloc(64 * 1024);
      for (let off = 0; off < SIZE; off += buf.length) {
        await drv.preadv(off, buf.length, [buf]);
        if (!buf.equals(data.subarray(off, off + buf.length))) throw new Error(`wrong data at ${off}`);
      }
      expect(drv.stats.bytesFetched).toBe(SIZE);
    } finally {
      await drv.close();
    }
  });

  it('a reader going backwards does not pile ranges up beyond the cache', async () => {
    const cacheBytes = 512 * 1024;
    const drv = await HttpDriver.open(nginx.url('disk.raw'), { cacheBytes });
    try {
      const buf = Buffer.alloc(64 * 1024);
      let most = 0;
      for (let off = SIZE - buf.length; off >= 0; off -= buf.length) {
        await drv.preadv(off, buf.length, [buf]);
        if (!buf.equals(data.subarray(off, off + buf.length))) throw new Error(`wrong data at ${off}`);
        most = Math.max(most, drv.cachedBytes);
      }
      // Each read starts one minimum window (128 KiB); the cache may exceed its bound by that.
      expect(most).toBeLessThanOrEqual(cacheBytes + 128 * 1024);
    } finally {
      await drv.close();
    }
  });
});
