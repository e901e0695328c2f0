/**
 * A server that lies or stalls on purpose gets nowhere: a body trickled a byte
 * at a time fails (or is retried) by its deadline instead of holding a read for
 * hours, sizes that are not safe integers are refused at open, a Content-Length
 * that disagrees with the range is an I/O error, and a Retry-After is read
 * strictly and capped.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { FaultServer, type FaultServerOptions } from '../helpers/fault-server.js';
import { MiB, Mount, shAsync, vdiskAsync } from '../helpers/vdisk.js';
import { seededData } from '../helpers/workload.js';
import { parseContentRange } from '../../src/drivers/http/numbers.js';
import { MAX_RETRY_AFTER_MS, parseRetryAfter, rangeDeadlineMs } from '../../src/drivers/http/retry.js';
import { redact, addSecret } from '../../src/secrets.js';

let dir: string;
const data = seededData(4 * MiB, 11);

useScratchDir({}, (d) => (dir = d));

async function withServer(options: Omit<FaultServerOptions, 'data'>, fn: (url: string, srv: FaultServer) => Promise<void>): Promise<void> {
  const srv = new FaultServer({ data, ...options });
  const url = await srv.start();
  try {
    await fn(url, srv);
  } finally {
    await srv.stop();
  }
}

/**
 * One direct 64 KiB read at 1 MiB of the mounted file, given `bound` seconds
 * (the old code waits for the trickle: 128 KiB at 20 bytes/s is almost two
 * hours). The bound is generous: it is there to fail the test, not to measure
 * it. A reader stuck in a FUSE read cannot even be killed (the kernel waits for
 * the answer), so past the bound the mount is killed instead, which fails the
 * read, and the test fails with what happened.
 */
async function boundedRead(m: Mount, bound = 60): Promise<{ status: number | null; stderr: string; data: Buffer }> {
  const read = shAsync(`set -o pipefail; dd if=${m.mountpoint} bs=64k skip=16 count=1 iflag=direct status=none | base64 -w0`);
  let timer: NodeJS.Timeout | undefined;
  const overdue = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), bound * 1000)));
  const r = await Promise.race([read, overdue]);
  clearTimeout(timer);
  if (r === null) {
    m.proc.kill('SIGKILL');
    await m.exited;
    await read;
    await shAsync(`umount -l ${m.mountpoint}`);
    throw new Error(`the read was still waiting after ${bound} s`);
  }
  return { status: r.status, stderr: r.stderr, data: Buffer.from(r.stdout, 'base64') };
}

/** Mount `url`, read as boundedRead does, stop the mount. */
async function mountAndRead(url: string, name: string, args: string[]): Promise<{ m: Mount; status: number | null; stderr: string; data: Buffer }> {
  const m = await Mount.start(url, path.join(dir, `${name}.mnt`), args);
  const r = await boundedRead(m);
  expect(await m.stop()).toBe(0);
  return { m, ...r };
}

describe('a server that trickles its answer', () => {
  // --http-timeout 2: the 128 KiB range the read starts must be complete within 2 s + 2 s.
  const opts = ['--direct-io', '--http-timeout', '2'];

  it('fails the read with EIO once retries are spent, saying why', async () => {
    await withServer({ fault: 'trickle', times: Infinity }, async (url, srv) => {
      const { m, ...r } = await mountAndRead(url, 'trickle-fail', [...opts, '--http-retries', '1']);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/Input\/output error/);
      expect(m.stderr).toMatch(/vdisk: read failed: http:\/\/127\.0\.0\.1:\d+\/image: GET bytes=1048576-\d+ failed after 2 attempts: \d+ bytes not complete within [\d.]+ s \(--http-timeout plus 1 s per 64 KiB\)/);
      // The probe, then two attempts, the second asking only for what the first had not delivered.
      expect(srv.gets).toHaveLength(3);
      expect(srv.gets[2]![0]).toBeGreaterThan(MiB);
    });
  });

  it('a retry against a good second answer returns the right data', async () => {
    await withServer({ fault: 'trickle', times: 1 }, async (url, srv) => {
      const r = await mountAndRead(url, 'trickle-retry', [...opts, '--http-retries', '2']);
      expect(r.status, r.stderr).toBe(0);
      expect(r.data.equals(data.subarray(MiB, MiB + 65536))).toBe(true);
      expect(srv.gets.length).toBeGreaterThanOrEqual(3);
    });
  });

  it('the deadline grows with the size asked for and starts from --http-timeout', () => {
    expect(rangeDeadlineMs(0, 30_000)).toBe(30_000);
    expect(rangeDeadlineMs(128 * 1024, 2000)).toBe(4000);
    expect(rangeDeadlineMs(4 * MiB, 30_000)).toBe(30_000 + 64_000);
  });
});

describe('numbers from the server', () => {
  it.each([
    ['10^30', '1' + '0'.repeat(30)],
    ['2^53 + 1', '9007199254740993'],
    ['not a number', 'lots'],
    ['negative', '-5'],
    ['a fraction', '4194304.5'],
    ['empty', ''],
  ])('a Content-Range total that is %s is refused at open with one line', async (_what, total) => {
    await withServer({ contentRangeTotal: total }, async (url) => {
      const r = await vdiskAsync(['info', url]);
      expect(r.status).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^vdisk: error ERR_HTTP: http:\/\/127\.0\.0\.1:\d+\/image: unusable Content-Range '.*' in the answer to bytes=0-0 \(want 'bytes 0-0\/SIZE', SIZE below 2\^53\)\n$/);
    });
  });

  it('the largest safe size is accepted', async () => {
    await withServer({ contentRangeTotal: String(Number.MAX_SAFE_INTEGER) }, async (url) => {
      const r = await vdiskAsync(['info', '--output', 'json', url]);
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ 'virtual-size': Number.MAX_SAFE_INTEGER });
    });
  });

  it('a Content-Length that disagrees with the range is an I/O error that says so', async () => {
    await withServer({ fault: 'short-length', times: Infinity }, async (url) => {
      const { m, ...r } = await mountAndRead(url, 'short-length', ['--direct-io', '--http-timeout', '2']);
      expect(r.stderr).toMatch(/Input\/output error/);
      expect(m.stderr).toMatch(/vdisk: read failed: http:\/\/127\.0\.0\.1:\d+\/image: Content-Length '131071' in the answer to GET bytes=1048576-1179647, which is 131072 bytes/);
    });
  });

  it('a huge Retry-After is capped (at --http-timeout here): the retry comes, and the read succeeds', async () => {
    await withServer({ fault: '503', times: 1, retryAfter: '9'.repeat(400) }, async (url, srv) => {
      const r = await mountAndRead(url, 'retry-after', ['--direct-io', '--http-timeout', '2']);
      expect(r.status, r.stderr).toBe(0);
      expect(r.data.equals(data.subarray(MiB, MiB + 65536))).toBe(true);
      expect(srv.gets.length).toBe(3);
    });
  });

  it('Retry-After: delay-seconds or an HTTP-date, capped; anything else is ignored', () => {
    const now = Date.parse('Sat, 21 Nov 2026 10:00:00 GMT');
    expect(parseRetryAfter('3', now)).toBe(3000);
    expect(parseRetryAfter('9'.repeat(400), now)).toBe(MAX_RETRY_AFTER_MS);
    expect(parseRetryAfter('Sat, 21 Nov 2026 10:00:05 GMT', now)).toBe(5000);
    expect(parseRetryAfter('Sat, 21 Nov 2026 09:00:00 GMT', now)).toBe(0);
    expect(parseRetryAfter('Fri, 31 Dec 9999 23:59:59 GMT', now)).toBe(MAX_RETRY_AFTER_MS);
    for (const bad of ['1e3', '-1', '1.5', '0x10', 'soon', '']) expect(parseRetryAfter(bad, now), bad).toBeUndefined();
  });

  it('Content-Range: three safe integers in order, or nothing', () => {
    expect(parseContentRange('bytes 0-0/16777216')).toEqual({ start: 0, end: 0, total: 16777216 });
    expect(parseContentRange('bytes 5-9/*')).toEqual({ start: 5, end: 9, total: null });
    for (const bad of ['bytes 0-0/' + '1'.repeat(31), 'bytes 9-5/100', 'bytes 0-100/100', 'bytes 0-0/', 'bytes=0-0/1', undefined]) {
      expect(parseContentRange(bad), String(bad)).toBeNull();
    }
  });
});

describe('the secrets safety net', () => {
  it('drops credentials and queries of URLs in any text, and masks registered values', () => {
    addSecret('hunter2-token');
    expect(redact('GET https://bob:pw@example.org/a/b.iso?sig=xyz#frag failed')).toBe('GET https://example.org/a/b.iso failed');
    expect(redact('see http://example.org/user@host/x')).toBe('see http://example.org/user@host/x');
    expect(redact('header value hunter2-token was refused')).toBe('header value <secret> was refused');
    expect(redact('/var/tmp/a.qcow2 offset=4096')).toBe('/var/tmp/a.qcow2 offset=4096');
  });
});
