/**
 * HTTPS backing: nginx with a certificate from a CA made for the test. An
 * untrusted certificate is a clear one-line error; --ca-file trusts the CA
 * (on top of the system's store); --insecure skips the check. A redirect
 * from https to plain http is refused.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { FaultServer } from '../helpers/fault-server.js';
import { Nginx } from '../helpers/nginx.js';
import { MiB, Mount, sh, vdisk, vdiskAsync } from '../helpers/vdisk.js';
import { seededData } from '../helpers/workload.js';

let dir: string;
let nginx: Nginx;
let caFile: string;
let otherCa: string;
let data: Buffer;
/** The server's certificate (signed by caFile's CA, for 127.0.0.1) and key, PEM. */
let tls: { cert: Buffer; key: Buffer };

function run(cmd: string): void {
  const r = sh(cmd);
  if (r.status !== 0) throw new Error(`${cmd}: ${r.stderr}`);
}

/** A CA, and a certificate it signs for 127.0.0.1 (EC keys: quick to make). */
function makeCa(name: string): string {
  const key = path.join(dir, `${name}.key`);
  const pem = path.join(dir, `${name}.pem`);
  run(`openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${pem} -days 2 -subj '/CN=vdisk test ${name}' 2>&1`);
  return pem;
}

useScratchDir({ tools: { nginx: 'nginx-light', openssl: 'openssl' } }, (d) => (dir = d));

beforeAll(async () => {
  caFile = makeCa('ca');
  otherCa = makeCa('other-ca');
  const key = path.join(dir, 'server.key');
  const cert = path.join(dir, 'server.pem');
  fs.writeFileSync(path.join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  run(`openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ${key} -out ${dir}/server.csr -subj '/CN=127.0.0.1' 2>&1`);
  run(`openssl x509 -req -in ${dir}/server.csr -CA ${caFile} -CAkey ${dir}/ca.key -CAcreateserial -out ${cert} -days 2 -extfile ${dir}/san.ext 2>&1`);
  tls = { cert: fs.readFileSync(cert), key: fs.readFileSync(key) };
  data = seededData(4 * MiB, 7);
  fs.mkdirSync(path.join(dir, 'www'));
  fs.writeFileSync(path.join(dir, 'www', 'disk.raw'), data);
  nginx = await Nginx.start(path.join(dir, 'www'), dir, { cert, key });
});

afterAll(async () => {
  await nginx?.stop();
});

describe('HTTPS backing', () => {
  it('an untrusted certificate is a one-line ERR_HTTP_TLS error that says what to do', () => {
    for (const extra of [[], ['--ca-file', otherCa]]) {
      const r = vdisk(['info', ...extra, nginx.url('disk.raw')]);
      expect(r.status).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^vdisk: error ERR_HTTP_TLS: https:\/\/127\.0\.0\.1:\d+\/disk\.raw: TLS: .*--ca-file FILE trusts a CA, --insecure skips the check/);
    }
    expect(nginx.requests()).toHaveLength(0);
  });

  it('--ca-file trusts the CA: a copy-on-read overlay on the https URL reads the right data', async () => {
    const image = path.join(dir, 'tls.qcow2');
    const c = vdisk(['create', '-f', 'qcow2', '--ca-file', caFile, '-b', nginx.url('disk.raw'), '-F', 'raw', image]);
    expect(c.status, c.stderr).toBe(0);
    const m = await Mount.start(image, `${image}.mnt`, ['--ca-file', caFile, '--copy-on-read']);
    try {
      expect(sh(`cmp ${image}.mnt ${path.join(dir, 'www', 'disk.raw')}`).status).toBe(0);
    } finally {
      expect(await m.stop()).toBe(0);
    }
    // Without the CA the same image cannot reach its backing.
    expect(vdisk(['info', '--backing-chain', image]).stderr).toMatch(/ERR_HTTP_TLS/);
  });

  it('--insecure skips the check', () => {
    const r = vdisk(['info', '--output', 'json', '--insecure', nginx.url('disk.raw')]);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ 'virtual-size': data.length });
  });
});

describe('HTTPS to a server that does not speak it', () => {
  it('is one ERR_HTTP line naming the URL (not an OpenSSL code and line)', async () => {
    const plain = new FaultServer({ data });
    const url = (await plain.start()).replace(/^http:/, 'https:');
    try {
      const r = await vdiskAsync(['info', '--http-retries', '0', '--ca-file', caFile, url]);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^vdisk: error ERR_HTTP: https:\/\/127\.0\.0\.1:\d+\/image: GET bytes=0-0: [^\n]*wrong version number[^\n]*\n$/);
      expect(r.status).toBe(1);
    } finally {
      await plain.stop();
    }
  });
});

describe('redirects from HTTPS', () => {
  /** An https server whose /redirect answers a 302 to `to` (made from the server that follows). */
  async function redirecting(target: FaultServer, fn: (url: string) => Promise<void>): Promise<void> {
    const to = await target.start();
    const from = new FaultServer({ data, tls, redirect: to });
    const url = (await from.start()).replace('/image', '/redirect');
    try {
      await fn(url);
    } finally {
      await from.stop();
      await target.stop();
    }
  }

  it('to plain http are refused with one ERR_HTTP line, and the http server is never asked', async () => {
    const plain = new FaultServer({ data });
    await redirecting(plain, async (url) => {
      for (const args of [['info', url], ['create', '-f', 'qcow2', '-F', 'raw', '-b', url, path.join(dir, 'downgrade.qcow2')]]) {
        const r = await vdiskAsync([...args, '--ca-file', caFile]);
        expect(r.status).toBe(1);
        expect(r.stderr).toMatch(/^vdisk: error ERR_HTTP: https:\/\/127\.0\.0\.1:\d+\/redirect: redirected to http:\/\/127\.0\.0\.1:\d+\/image; refusing to leave https for plain http\n$/);
      }
      expect(fs.existsSync(path.join(dir, 'downgrade.qcow2'))).toBe(false);
      expect(plain.requests).toEqual([]);
    });
  });

  it('to another https server are followed', async () => {
    const other = new FaultServer({ data, tls });
    await redirecting(other, async (url) => {
      const r = await vdiskAsync(['info', '--output', 'json', '--ca-file', caFile, url]);
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ 'virtual-size': data.length });
      expect(other.requests.length).toBeGreaterThan(0);
    });
  });
});
