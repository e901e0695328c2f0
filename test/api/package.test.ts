/**
 * The package as users get it: `npm pack`, installed into a scratch project
 * with npm itself (offline, from the npm cache: the lock is the project's own,
 * cut down to the runtime dependencies), so the install script builds the
 * addon, and `import 'vdisk'` resolves through package.json `exports` to the
 * shipped entry point and typings. Everything is checked with real tools:
 * qemu-img and qemu-io read the images the API made, dd reads the API's mount,
 * tsc checks a .ts file against the shipped typings, nginx serves the example.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { expectQemuClean, qemuImg, qemuImgMap } from '../helpers/image.js';
import { Nginx } from '../helpers/nginx.js';
import { MiB, isMounted, sh, shAsync } from '../helpers/vdisk.js';
import { seededData } from '../helpers/workload.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** npm pack, npm ci with a native build, and tsc, on a loaded 2-core machine. */
const INSTALL_TIMEOUT = 300_000;

let dir: string;
/** The scratch project vdisk is installed into. */
let app: string;
let installed: string;

useScratchDir({ tools: { nginx: 'nginx-light', 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', npm: 'npm' } }, (d) => (dir = d));

/**
 * A lock for the scratch project: the tarball, and the project's own locked
 * runtime dependencies (their integrity hashes find them in the npm cache, so
 * `npm ci --offline` needs no registry).
 */
function consumerLock(tarball: string): object {
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string>; dependencies: Record<string, string> };
  const integrity = `sha512-${createHash('sha512').update(fs.readFileSync(path.join(app, tarball))).digest('base64')}`;
  const packages: Record<string, object> = {
    '': { name: 'consumer', dependencies: { vdisk: `file:${tarball}` } },
    'node_modules/vdisk': { version: pkg.version, resolved: `file:${tarball}`, integrity, hasInstallScript: true, bin: pkg.bin, dependencies: pkg.dependencies },
  };
  for (const [key, entry] of Object.entries(lock.packages)) if (key !== '' && !entry.dev) packages[key] = entry;
  return { name: 'consumer', lockfileVersion: 3, requires: true, packages };
}

beforeAll(async () => {
  app = path.join(dir, 'app');
  fs.mkdirSync(app);
  // dist/ is built already (npm test's pretest); --ignore-scripts: no rebuild under other tests' feet.
  const pack = await shAsync(`cd ${ROOT} && npm pack --ignore-scripts --silent --pack-destination ${app}`);
  expect(pack.status, pack.stderr).toBe(0);
  const tarball = pack.stdout.trim().split('\n').pop()!;
  fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module', dependencies: { vdisk: `file:${tarball}` } }));
  fs.writeFileSync(path.join(app, 'package-lock.json'), JSON.stringify(consumerLock(tarball)));
  const ci = await shAsync(`cd ${app} && npm ci --offline --no-audit --no-fund --foreground-scripts 2>&1`);
  expect(ci.status, `npm ci --offline failed (ENOTCACHED: run npm ci once in the project to fill the npm cache):\n${ci.stdout}`).toBe(0);
  installed = path.join(app, 'node_modules', 'vdisk');
}, INSTALL_TIMEOUT);

describe('the installed package', () => {
  it('ships the entry point, its typings and the addon sources, and builds the addon on install', () => {
    for (const f of ['dist/index.js', 'dist/index.d.ts', 'dist/cli/main.js', 'binding.gyp', 'native/vdisk_fuse.c', 'examples/api.mjs', 'build/Release/vdisk_fuse.node']) {
      expect(fs.existsSync(path.join(installed, f)), f).toBe(true);
    }
    // Tests and TypeScript sources stay home.
    expect(fs.existsSync(path.join(installed, 'test'))).toBe(false);
    expect(fs.existsSync(path.join(installed, 'src'))).toBe(false);
    // The CLI comes with it.
    const v = sh(`${path.join(app, 'node_modules', '.bin', 'vdisk')} --help`);
    expect(v.status, v.stderr).toBe(0);
    expect(v.stdout).toMatch(/mount/);
  });

  it("an ESM script imports 'vdisk' by name: creates a qcow2 over a raw file, writes, zeroes, reads, mounts and streams; qemu-img agrees", async () => {
    const work = path.join(dir, 'esm');
    fs.mkdirSync(work);
    const script = path.join(app, 'use-api.mjs');
    fs.writeFileSync(
      script,
      `import { promisify } from 'node:util';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { VdiskError, IMAGE_FORMATS, blockStatus, close, createImage, flush, mount, openImage, read, stream, write, writeZeroes } from 'vdisk';
const MiB = 1024 * 1024;
const dir = process.argv[2];
const out = { formats: IMAGE_FORMATS };
await createImage(dir + '/base.raw', { size: 4 * MiB });
const base = await openImage(dir + '/base.raw', { format: 'raw' });
await write(base, 0, Buffer.alloc(4 * MiB, 0x11));
await flush(base);
await close(base);
const made = await createImage(dir + '/top.qcow2', { format: 'qcow2', backingFile: 'base.raw', backingFormat: 'raw' });
out.made = made;
const disk = await openImage(dir + '/top.qcow2');
await write(disk, 1000, Buffer.alloc(70000, 0x22));
await writeZeroes(disk, 2 * MiB, MiB, { mayUnmap: true });
const all = await read(disk, 0, 4 * MiB);
out.read = all.toString('base64');
const st = await blockStatus(disk, 2 * MiB, MiB);
out.status = { bytes: st.bytes, allocated: st.allocated, zero: st.zero, node: st.node?.name };
try {
  await createImage(dir + '/top.qcow2', { format: 'qcow2', size: MiB });
} catch (err) {
  out.exists = { isVdiskError: err instanceof VdiskError, code: err.code };
}
try {
  await openImage(dir + '/missing.qcow2');
} catch (err) {
  out.missing = { isVdiskError: err instanceof VdiskError, code: err.code };
}
// The addon npm built at install serves the mount; dd reads it from another process.
const mnt = dir + '/disk.mnt';
fs.writeFileSync(mnt, '');
const exp = await mount(disk, mnt, { readOnly: true });
await promisify(execFile)('dd', ['if=' + mnt, 'of=' + dir + '/mounted.raw', 'bs=1M', 'status=none']);
await exp.stop();
await close(disk);
// A job: stream a second overlay until it stands alone.
await createImage(dir + '/alone.qcow2', { format: 'qcow2', backingFile: 'base.raw', backingFormat: 'raw' });
const alone = await openImage(dir + '/alone.qcow2');
const job = stream(alone, { dropBacking: true });
await job.concluded;
out.job = { type: job.info().type, state: job.info().state, status: job.info().status, droppedBacking: job.result?.droppedBacking };
await close(alone);
console.log(JSON.stringify(out));
`,
    );
    const r = await shAsync(`cd ${app} && node use-api.mjs ${work}`);
    // A script that died while mounted leaves a dead mount: take it away before the scratch directory goes.
    const mnt = path.join(work, 'disk.mnt');
    if (isMounted(mnt)) sh(`umount -l ${mnt}`);
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown> & { read: string };

    const expected = Buffer.alloc(4 * MiB, 0x11);
    expected.fill(0x22, 1000, 71000);
    expected.fill(0, 2 * MiB, 3 * MiB);
    expect(out['formats']).toEqual(['raw', 'qcow2']);
    expect(out['made']).toEqual({ file: path.join(work, 'top.qcow2'), format: 'qcow2', size: 4 * MiB, backingFile: 'base.raw', backingFormat: 'raw' });
    expect(Buffer.from(out.read, 'base64').equals(expected)).toBe(true);
    expect(out['status']).toEqual({ bytes: MiB, allocated: true, zero: true, node: path.join(work, 'top.qcow2') });
    expect(out['exists']).toEqual({ isVdiskError: true, code: 'EEXIST' });
    expect(out['missing']).toEqual({ isVdiskError: true, code: 'ERR_IMAGE_NOT_FOUND' });
    expect(fs.readFileSync(path.join(work, 'mounted.raw')).equals(expected)).toBe(true);

    expect(out['job']).toEqual({ type: 'stream', state: 'concluded', status: 'completed', droppedBacking: true });

    // What qemu makes of the images the API wrote.
    const top = path.join(work, 'top.qcow2');
    expectQemuClean(top);
    expect(qemuImg(`info ${top}`)).toMatch(/backing file: base\.raw/);
    qemuImg(`convert -f qcow2 -O raw ${top} ${path.join(work, 'qemu.raw')}`);
    expect(fs.readFileSync(path.join(work, 'qemu.raw')).equals(expected)).toBe(true);
    const io = sh(`qemu-io -f qcow2 -r ${top} -c 'read -P 0x11 0 1000' -c 'read -P 0x22 1000 70000' -c 'read -P 0 2M 1M' -c 'read -P 0x11 3M 1M'`);
    expect(io.status, io.stderr).toBe(0);
    expect(io.stdout).not.toMatch(/Pattern verification failed/);
    // The zeroed stretch is zero clusters in the overlay, not data and not the backing file's.
    const zeroed = qemuImgMap(top).filter((e) => e.start < 3 * MiB && e.start + e.length > 2 * MiB);
    expect(zeroed.every((e) => e.zero && !e.data && e.depth === 0)).toBe(true);
    // The streamed overlay: no backing file any more, and the base's contents.
    const alone = path.join(work, 'alone.qcow2');
    expectQemuClean(alone);
    expect(qemuImg(`info ${alone}`)).not.toMatch(/backing file/);
    qemuImg(`convert -f qcow2 -O raw ${alone} ${path.join(work, 'alone.raw')}`);
    expect(fs.readFileSync(path.join(work, 'alone.raw')).equals(Buffer.alloc(4 * MiB, 0x11))).toBe(true);
  });

  it('a .ts file typechecks against the shipped typings, and wrong calls do not', () => {
    const ts = path.join(app, 'consumer.ts');
    fs.writeFileSync(
      ts,
      `import { VdiskError, blockStatus, close, createImage, discard, drain, flush, imageStats, mount, openImage, read, stream, write, writeZeroes } from 'vdisk';
import type { BlockStatus, CreatedImage, ErrorCode, ExportStats, ImageStats, JobInfo, OpenImageOptions } from 'vdisk';

export async function main(): Promise<void> {
  const options: OpenImageOptions = { copyOnRead: true, detectZeroes: 'unmap', discard: 'ignore', http: { retries: 2, headers: { authorization: 'x' } } };
  const made: CreatedImage = await createImage('top.qcow2', { format: 'qcow2', backingFile: 'https://example.org/disk.img', backingFormat: 'raw', qcow2: { clusterSize: 65536, lazyRefcounts: true } });
  const disk = await openImage(made.file, options);
  const head: Buffer = await read(disk, 0, 512);
  await write(disk, 0, [head, head]);
  await writeZeroes(disk, 0, 4096, { mayUnmap: true });
  await discard(disk, 0, 4096);
  const st: BlockStatus = await blockStatus(disk, 0, 4096, { chain: false });
  const zero: boolean = st.zero;
  const job = stream(disk, { rateLimit: 1 << 20, dropBacking: true });
  const info: JobInfo = job.info();
  await job.concluded;
  const exp = await mount(disk, 'disk.mnt', { readOnly: true, directIo: true });
  const counters: ExportStats = exp.stats;
  await exp.stop();
  await drain(disk);
  const stats: ImageStats = imageStats(disk);
  await flush(disk);
  await close(disk);
  void [zero, info, counters, stats.http.bytesFetched, stats.copyOnRead.bytesCopied];
  try {
    // @ts-expect-error detectZeroes is 'off' | 'on' | 'unmap'
    await openImage('x', { detectZeroes: 'sometimes' });
    // @ts-expect-error offsets are numbers
    await read(disk, '0', 512);
    // @ts-expect-error write takes buffers
    await write(disk, 0, 'text');
  } catch (err) {
    if (err instanceof VdiskError) {
      const code: ErrorCode = err.code;
      const errno: number = err.errno;
      void [code, errno];
    }
  }
}
`,
    );
    fs.writeFileSync(
      path.join(app, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          strict: true,
          noEmit: true,
          // The shipped .d.ts files are checked too, as a user's strict build would.
          skipLibCheck: false,
          types: ['node'],
          // @types/node is a dev dependency of the project, not of the scratch one.
          typeRoots: [path.join(ROOT, 'node_modules', '@types')],
        },
        files: ['consumer.ts'],
      }),
    );
    const tsc = sh(`cd ${app} && ${path.join(ROOT, 'node_modules', '.bin', 'tsc')} -p tsconfig.json 2>&1`);
    expect(tsc.stdout, tsc.stdout).toBe('');
    expect(tsc.status).toBe(0);
  });
});

describe('examples/api.mjs', () => {
  const SIZE = 16 * MiB;
  let nginx: Nginx;
  let data: Buffer;

  beforeAll(async () => {
    data = seededData(SIZE, 10);
    fs.mkdirSync(path.join(dir, 'www'));
    fs.writeFileSync(path.join(dir, 'www', 'disk.raw'), data);
    nginx = await Nginx.start(path.join(dir, 'www'), dir);
  });

  afterAll(async () => {
    await nginx?.stop();
  });

  it('reads a range of a remote raw image through a copy-on-read overlay; the second read costs no HTTP request', async () => {
    const offset = 3 * MiB + 512;
    const length = 2 * MiB;
    // With credentials in the URL (nginx ignores them): the output must not show them.
    const url = nginx.url('disk.raw').replace('://', '://reader:sekrit@');
    const r = await shAsync(`node ${path.join(installed, 'examples', 'api.mjs')} ${url} ${offset} ${length}`);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout + r.stderr).not.toContain('sekrit');
    const sha = createHash('sha256').update(data.subarray(offset, offset + length)).digest('hex');
    expect(r.stdout).toContain(`read ${length} bytes at ${offset}: sha256 ${sha}`);
    const stats = (label: string) => JSON.parse(new RegExp(`^${label}:\\s+(.*)$`, 'm').exec(r.stdout)![1]!) as { copyOnRead: { bytesFromBacking: number; bytesCopied: number; copyFailures: number }; http: { requests: number; bytesFetched: number } };
    const first = stats('after the first read');
    const second = stats('after the second read');
    expect(first.http.requests).toBeGreaterThan(0);
    expect(first.http.bytesFetched).toBeGreaterThanOrEqual(length);
    expect(first.copyOnRead.bytesCopied).toBeGreaterThanOrEqual(length);
    expect(first.copyOnRead.copyFailures).toBe(0);
    // Kept in the overlay: nothing more from the server, nothing more from the backing chain.
    // (bytesFetched may still grow: readahead answers already asked for keep streaming in.)
    expect(second.copyOnRead).toEqual(first.copyOnRead);
    expect(second.http.requests).toBe(first.http.requests);
  });

  it('a URL that is not there: one line with a code, exit status 1', async () => {
    const r = await shAsync(`node ${path.join(installed, 'examples', 'api.mjs')} ${nginx.url('missing.raw')}`);
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^api\.mjs: error [A-Z_]+: /);
  });
});
