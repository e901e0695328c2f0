/**
 * Secrets never reach the terminal: a backing URL's user:password and query
 * string, and the value of --header, appear in no message and no trace
 * (DEBUG=vdisk:* shows every trace), whether the command works or fails.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { FaultServer } from '../helpers/fault-server.js';
import { MiB, Mount, shAsync, vdiskAsync, type RunResult } from '../helpers/vdisk.js';
import { seededData } from '../helpers/workload.js';

let dir: string;
let srv: FaultServer;
/** The URL with everything secret in it: a password, and a token in the query. */
let url: string;
const data = seededData(4 * MiB, 9);
const bearer = ['--header', 'Authorization: Bearer secret-bearer'];
let debugBefore: string | undefined;

useScratchDir({}, (d) => (dir = d));

beforeAll(async () => {
  // The child processes (CLI, mounts) inherit it; vitest runs each test file in a process of its own.
  debugBefore = process.env['DEBUG'];
  process.env['DEBUG'] = 'vdisk:*';
  srv = new FaultServer({ data, auth: 'Bearer secret-bearer' });
  url = (await srv.start()).replace('http://', 'http://alice:secret-password@') + '?token=secret-token';
});

afterAll(async () => {
  await srv?.stop();
  if (debugBefore === undefined) delete process.env['DEBUG'];
  else process.env['DEBUG'] = debugBefore;
});

function expectNoSecret(what: string, r: RunResult | string): void {
  const text = typeof r === 'string' ? r : r.stdout + r.stderr;
  expect(text.length, `${what} printed nothing: the traces are off`).toBeGreaterThan(0);
  const line = text.split('\n').find((l) => /secret/.test(l));
  expect(line, `${what} shows a secret`).toBeUndefined();
}

async function readBlock(file: string): Promise<Buffer> {
  const r = await shAsync(`dd if=${file} bs=64k count=1 iflag=direct status=none | base64 -w0`);
  return Buffer.from(r.stdout, 'base64');
}

describe('secrets in messages and traces (DEBUG=vdisk:*)', () => {
  it('working commands: create, info, map, a mount of the URL and of an overlay on it', async () => {
    const image = path.join(dir, 'ok.qcow2');
    const c = await vdiskAsync(['create', '-f', 'qcow2', ...bearer, '-b', url, '-F', 'raw', image]);
    expect(c.status, c.stderr).toBe(0);
    expect(c.stderr).toMatch(/vdisk:http open/);
    expectNoSecret('create', c);
    // The image records the URL as given: it is what the overlay needs to reach its backing.
    expect(fs.readFileSync(image).includes('secret-password')).toBe(true);

    for (const args of [['info', '--backing-chain', image], ['info', '--output', 'json', '--backing-chain', image], ['map', image]]) {
      const r = await vdiskAsync([...args, ...bearer]);
      expect(r.status, r.stderr).toBe(0);
      expectNoSecret(args.join(' '), r);
    }

    const direct = await Mount.start(url, path.join(dir, 'url.mnt'), [...bearer, '--direct-io']);
    try {
      expect((await readBlock(direct.mountpoint)).equals(data.subarray(0, 65536))).toBe(true);
    } finally {
      expect(await direct.stop()).toBe(0);
    }
    expectNoSecret('mount URL', direct.stderr);

    const overlay = await Mount.start(image, `${image}.mnt`, [...bearer, '--copy-on-read', '--stats']);
    try {
      expect((await readBlock(overlay.mountpoint)).equals(data.subarray(0, 65536))).toBe(true);
    } finally {
      expect(await overlay.stop()).toBe(0);
    }
    expect(overlay.stderr).toMatch(/vdisk:qcow2 open .*backing=http:\/\/127\.0\.0\.1:\d+\/image/);
    expectNoSecret('mount overlay', overlay.stderr);
    expect(srv.seenAuth.every((a) => a === 'Bearer secret-bearer')).toBe(true);
  });

  it('failing commands: wrong credentials, a dead server, a URL where a file is needed, a malformed --header', async () => {
    const failures: Array<[string, RunResult]> = [];
    failures.push(['wrong bearer', await vdiskAsync(['info', '--header', 'Authorization: Bearer secret-wrong', url])]);
    failures.push(['basic only', await vdiskAsync(['info', url])]);
    failures.push(['stream URL', await vdiskAsync(['stream', ...bearer, url])]);
    failures.push(['check URL', await vdiskAsync(['check', ...bearer, url])]);
    failures.push(['header without a name', await vdiskAsync(['info', '--header', 'Bearer secret-bearer', url])]);
    failures.push(['header name with a space', await vdiskAsync(['info', '--header', 'Bearer secret-bearer: x', url])]);
    failures.push(['header value with a line break', await vdiskAsync(['info', '--header', 'Authorization: Bearer secret-bearer\r\nX: y', url])]);
    failures.push(['mount on a missing mountpoint', await vdiskAsync(['mount', ...bearer, url, path.join(dir, 'missing', 'mnt')])]);
    const dead = new FaultServer({ data });
    const deadUrl = (await dead.start()).replace('http://', 'http://alice:secret-password@') + '?token=secret-token';
    await dead.stop();
    failures.push(['dead server', await vdiskAsync(['info', '--http-retries', '1', ...bearer, deadUrl])]);
    for (const [what, r] of failures) {
      expect(r.status, `${what}: ${r.stderr}`).not.toBe(0);
      expect(r.stderr, what).toMatch(/^vdisk: error [A-Z_]+: /m);
      expectNoSecret(what, r);
    }
  });

  it('a mount whose server goes away: the failed read is reported without secrets', async () => {
    const gone = new FaultServer({ data, auth: 'Bearer secret-bearer' });
    const goneUrl = (await gone.start()).replace('http://', 'http://alice:secret-password@') + '?token=secret-token';
    const m = await Mount.start(goneUrl, path.join(dir, 'gone.mnt'), [...bearer, '--direct-io', '--http-retries', '1']);
    try {
      await gone.stop();
      const r = await shAsync(`dd if=${m.mountpoint} of=/dev/null bs=64k count=1 skip=10 iflag=direct status=none`);
      expect(r.stderr).toMatch(/Input\/output error/);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    expect(m.stderr).toMatch(/vdisk: read failed: .*failed after 2 attempts/);
    expectNoSecret('failed read', m.stderr);
  });
});
