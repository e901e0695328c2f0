/**
 * The addon answers every request. A reply whose arguments cannot be converted
 * (not a number, NaN, a fraction, out of range for off_t, an errno the kernel
 * refuses) answers EIO instead of leaving the process doing the I/O hanging,
 * and a second reply to one request is refused instead of touching the freed
 * request. The served file lives in this test process (the addon driven
 * directly, or a FuseExport over a driver that reports a bogus size); real
 * tools in child processes do the I/O, bounded by a timeout that fails the test.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { BlockNode } from '../../src/block/node.js';
import { MemoryDriver } from '../../src/drivers/memory.js';
import { FuseExport } from '../../src/export/fuse-export.js';
import { SEEK_DATA, native, type FuseHandlers, type FuseReq, type FuseSessionHandle } from '../../src/native.js';
import { useScratchDir } from '../helpers/env.js';
import { isMounted, sh, vdiskAsync } from '../helpers/vdisk.js';

const SIZE = 1024 * 1024;
/** Far above any answer time: a tool still blocked after this is waiting for a reply that never comes. */
const TOOL_TIMEOUT_MS = 30_000;

let dir: string;
useScratchDir({ tools: { python3: 'python3', dd: 'coreutils' } }, (d) => (dir = d));

/** One file operation by python3, printing 'ok' or the errno name it failed with. */
const PY = `
import errno, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == 'getattr':
        os.stat(path)
    elif op == 'setattr':
        os.utime(path, (1, 1))
    elif op == 'statfs':
        os.statvfs(path)
    else:
        fd = os.open(path, os.O_RDWR)
        if op == 'read':
            os.pread(fd, 4096, 0)
        elif op == 'write':
            n = os.pwrite(fd, b'x' * 4096, 0)
            if n != 4096:
                print('short write %d' % n)
                sys.exit(0)
        elif op == 'lseek':
            os.lseek(fd, 0, os.SEEK_DATA)
        elif op == 'fsync':
            os.fsync(fd)
        elif op == 'fallocate':
            os.posix_fallocate(fd, 0, 4096)
        os.close(fd)
    print('ok')
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
`;

interface ToolResult {
  out: string;
  /** Still blocked when the time was up: it was waiting for an answer that never came. */
  hung: boolean;
}

/**
 * Run a tool without blocking this process's event loop, which serves the file
 * it uses. A process waiting for a request the server already took cannot even
 * be killed (the kernel waits for the answer uninterruptibly), so when the
 * time is up `abort` ends the FUSE connection, which fails the request.
 */
function tool(cmd: string, args: string[], abort: () => void): Promise<ToolResult> {
  return new Promise((resolve) => {
    let hung = false;
    const timer = setTimeout(() => {
      hung = true;
      abort();
    }, TOOL_TIMEOUT_MS);
    execFile(cmd, args, { encoding: 'utf8' }, (_err, stdout, stderr) => {
      clearTimeout(timer);
      resolve({ out: (stdout + stderr).trim(), hung });
    });
  });
}

/** What ends the FUSE connection behind each mountpoint. */
const abortOf = new Map<string, () => void>();
const pyOp = (op: string, file: string) => tool('python3', ['-c', PY, op, file], abortOf.get(file)!);

const addon = native();
const sessions: FuseSessionHandle[] = [];
const exports: FuseExport[] = [];

afterEach(async () => {
  // Closing the session unmounts and aborts the connection: a request left unanswered (old code) fails there.
  for (const s of sessions.splice(0)) addon.close(s);
  for (const e of exports.splice(0)) await e.close();
});

afterAll(() => {
  for (const f of dir ? fs.readdirSync(dir) : []) {
    const p = path.join(dir, f);
    if (isMounted(p)) sh(`umount -l ${p}`);
  }
});

/** Handlers that answer everything correctly, as the export would. */
function goodHandlers(): FuseHandlers {
  const now = Date.now();
  const attr = [SIZE, SIZE / 512, 4096, 0o100600, 0, 0, now, now, now];
  return {
    getattr: (req) => addon.replyAttr(req, attr, 0),
    setattr: (req) => addon.replyAttr(req, attr, 0),
    open: (req) => addon.replyOpen(req, true, false),
    release: (req) => addon.replyErr(req, 0),
    read: (req, offset, size) => addon.replyRead(req, [Buffer.alloc(Math.max(0, Math.min(size, SIZE - offset)))]),
    write: (req, _offset, data) => addon.replyWrite(req, data.length),
    flush: (req) => addon.replyErr(req, 0),
    fsync: (req) => addon.replyErr(req, 0),
    fallocate: (req) => addon.replyErr(req, 0),
    lseek: (req, offset) => addon.replyLseek(req, offset),
    statfs: (req) => addon.replyStatfs(req, [4096, SIZE / 4096, 0, 0, 1, 0, 255]),
  };
}

let serial = 0;

/** Mount a 1 MiB file served by `handlers` (the good ones where not given) in this process. */
function serve(handlers: Partial<FuseHandlers>, subtype = 'vdisk'): string {
  const mountpoint = path.join(dir, `mnt${serial++}`);
  fs.writeFileSync(mountpoint, '');
  const session = addon.mount(
    mountpoint,
    { fsOptions: `fsname=vdisk-reply-test,subtype=${subtype},default_permissions,max_read=${SIZE}`, maxWrite: SIZE, maxReadahead: SIZE },
    { ...goodHandlers(), ...handlers },
    () => undefined,
  );
  sessions.push(session);
  abortOf.set(mountpoint, () => {
    sessions.splice(sessions.indexOf(session), 1);
    addon.close(session);
  });
  return mountpoint;
}

/** Errors the bad replies threw back at the handler (the export logs them). */
let thrown: unknown[] = [];

/** Answer later, as the export does (after its I/O), keeping what the reply throws. */
function later(answer: (req: FuseReq) => void) {
  return (req: FuseReq) =>
    setImmediate(() => {
      try {
        answer(req);
      } catch (err) {
        thrown.push(err);
      }
    });
}

type Op = 'getattr' | 'setattr' | 'open' | 'read' | 'write' | 'lseek' | 'fsync' | 'fallocate' | 'statfs';

const now = Date.now();
const CASES: Array<[string, Op, Partial<FuseHandlers>]> = [
  ["replyWrite with a string count", 'write', { write: later((req) => addon.replyWrite(req, 'abc' as unknown as number)) }],
  ['replyWrite with NaN', 'write', { write: later((req) => addon.replyWrite(req, NaN)) }],
  ['replyWrite with a negative count', 'write', { write: later((req) => addon.replyWrite(req, -1)) }],
  ['replyWrite with 2^70', 'write', { write: later((req) => addon.replyWrite(req, 2 ** 70)) }],
  ['replyLseek with NaN', 'lseek', { lseek: later((req) => addon.replyLseek(req, NaN)) }],
  ['replyLseek with 2^64', 'lseek', { lseek: later((req) => addon.replyLseek(req, 2 ** 64)) }],
  ['replyLseek with a fraction', 'lseek', { lseek: later((req) => addon.replyLseek(req, 1.5)) }],
  ['replyLseek with a negative offset', 'lseek', { lseek: later((req) => addon.replyLseek(req, -4096)) }],
  ['replyOpen with a string flag', 'open', { open: later((req) => addon.replyOpen(req, 'yes' as unknown as boolean, false)) }],
  ['replyAttr with an object for the array', 'getattr', { getattr: later((req) => addon.replyAttr(req, {} as unknown as number[], 0)) }],
  ['replyAttr with a string size', 'getattr', { getattr: later((req) => addon.replyAttr(req, ['1', 1, 4096, 0o100600, 0, 0, now, now, now] as unknown as number[], 0)) }],
  ['replyAttr with a size of 2^70', 'getattr', { getattr: later((req) => addon.replyAttr(req, [2 ** 70, 1, 4096, 0o100600, 0, 0, now, now, now], 0)) }],
  ['replyAttr with NaN blocks', 'getattr', { getattr: later((req) => addon.replyAttr(req, [SIZE, NaN, 4096, 0o100600, 0, 0, now, now, now], 0)) }],
  ['replyAttr with an infinite mtime', 'getattr', { getattr: later((req) => addon.replyAttr(req, [SIZE, 1, 4096, 0o100600, 0, 0, now, Infinity, now], 0)) }],
  ['replyAttr with a NaN timeout', 'getattr', { getattr: later((req) => addon.replyAttr(req, [SIZE, 1, 4096, 0o100600, 0, 0, now, now, now], NaN)) }],
  ['replyAttr (setattr) with too few fields', 'setattr', { setattr: later((req) => addon.replyAttr(req, [SIZE, 1], 0)) }],
  ['replyStatfs with a string', 'statfs', { statfs: later((req) => addon.replyStatfs(req, [4096, 'x', 0, 0, 1, 0, 255] as unknown as number[])) }],
  ['replyStatfs with a negative count', 'statfs', { statfs: later((req) => addon.replyStatfs(req, [4096, -1, 0, 0, 1, 0, 255])) }],
  ['replyErr with errno 600 (the kernel drops such a reply)', 'fsync', { fsync: later((req) => addon.replyErr(req, 600)) }],
  ['replyErr with a negative errno', 'fsync', { fsync: later((req) => addon.replyErr(req, -5)) }],
  ['replyErr with a string', 'fallocate', { fallocate: later((req) => addon.replyErr(req, 'x' as unknown as number)) }],
  ['replyRead with a string for the buffers', 'read', { read: later((req) => addon.replyRead(req, 'x' as unknown as Buffer[])) }],
  ['replyReadAsync with an object for a buffer', 'read', { read: later((req) => void addon.replyReadAsync(req, [{} as Buffer])) }],
];

describe('the addon always answers', () => {
  it.each(CASES)('%s: the tool gets EIO, and the reply throws', async (_name, op, handlers) => {
    thrown = [];
    const file = serve(handlers);
    const r = await pyOp(op, file);
    expect(r.hung, `python3 ${op} was still blocked after ${TOOL_TIMEOUT_MS} ms`).toBe(false);
    expect(r.out).toBe('EIO');
    expect(thrown.length).toBeGreaterThan(0);
    expect((thrown[0] as { code?: string }).code).toBe('ERR_VDISK_REPLY_ARG');
  });

  it('dd writing through a reply that cannot be converted fails with EIO instead of hanging', async () => {
    const file = serve({ write: later((req) => addon.replyWrite(req, { bytes: 4096 } as unknown as number)) });
    const r = await tool('dd', ['if=/dev/zero', `of=${file}`, 'bs=4096', 'count=1', 'conv=notrunc'], abortOf.get(file)!);
    expect(r.hung, `dd was still blocked after ${TOOL_TIMEOUT_MS} ms`).toBe(false);
    expect(r.out).toMatch(/Input\/output error/);
  });

  it('a handler that throws after its failed reply is not answered twice', async () => {
    // The reply answers EIO and throws; dispatch sees the exception and must not answer again.
    const file = serve({ write: (req) => addon.replyWrite(req, NaN) });
    expect((await pyOp('write', file)).out).toBe('EIO');
    // The session still works: a double reply would have corrupted libfuse's request list.
    expect((await pyOp('read', file)).out).toBe('ok');
  });

  it('a second reply to one request throws instead of touching the answered request', async () => {
    const second: unknown[] = [];
    const file = serve({
      write: later((req) => {
        addon.replyWrite(req, 4096);
        try {
          addon.replyErr(req, 5);
        } catch (err) {
          second.push(err);
        }
      }),
    });
    expect((await pyOp('write', file)).out).toBe('ok');
    expect(second.map((e) => (e as { code?: string }).code)).toEqual(['ERR_VDISK_ANSWERED']);
    expect((await pyOp('read', file)).out).toBe('ok');
  });
});

describe('the host-file calls refuse offsets no off_t can hold', () => {
  it('lseek, fallocate and preadvNoWait throw ERR_VDISK_ARG for NaN, fractions, negatives and 2^63', async () => {
    const file = path.join(dir, 'host.raw');
    fs.writeFileSync(file, Buffer.alloc(8192));
    const fd = fs.openSync(file, 'r+');
    try {
      for (const bad of [NaN, 1.5, -1, 2 ** 63, Infinity]) {
        expect(() => addon.lseek(fd, bad, SEEK_DATA), `lseek ${bad}`).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
        expect(() => addon.fallocate(fd, 0, bad, 4096), `fallocate offset ${bad}`).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
        expect(() => addon.fallocate(fd, 0, 0, bad), `fallocate length ${bad}`).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
        expect(() => addon.preadvNoWait(fd, [Buffer.alloc(512)], bad), `preadvNoWait ${bad}`).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
      }
      // The largest offset an off_t holds is still passed on (the kernel answers it).
      await expect(addon.lseek(fd, 2 ** 63 - 1024, SEEK_DATA)).rejects.toMatchObject({ code: 'ENXIO' });
    } finally {
      fs.closeSync(fd);
    }
  });

  it('umount and mount refuse a path longer than PATH_MAX instead of acting on a cut-short one', () => {
    const long = `${dir}/${'a'.repeat(5000)}`;
    expect(() => addon.umount(long, 0)).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
    expect(() => addon.mount(long, { fsOptions: 'fsname=x' }, goodHandlers(), () => undefined)).toThrow(expect.objectContaining({ code: 'ERR_VDISK_ARG' }));
  });
});

/** A disk whose driver starts reporting a size the kernel cannot be told once armed (as a lying server would). */
class BogusSizeDriver extends MemoryDriver {
  bogus: unknown = null;
  override size(): number {
    return (this.bogus ?? super.size()) as number;
  }
}

describe('the FUSE export always answers', () => {
  it.each([
    ['a size that is not a number', '1048576'],
    ['a size beyond off_t', 2 ** 70],
    ['a NaN size', NaN],
  ])('getattr of a disk with %s answers EIO', async (_name, bogus) => {
    const driver = new BogusSizeDriver({ size: SIZE });
    const mountpoint = path.join(dir, `exp${serial++}`);
    fs.writeFileSync(mountpoint, '');
    const exp = await FuseExport.start(new BlockNode(driver), { mountpoint, readaheadKiB: 128 });
    exports.push(exp);
    abortOf.set(mountpoint, () => void exp.close());
    expect((await pyOp('getattr', mountpoint)).out).toBe('ok');
    driver.bogus = bogus;
    const r = await pyOp('getattr', mountpoint);
    expect(r.hung, `stat was still blocked after ${TOOL_TIMEOUT_MS} ms`).toBe(false);
    expect(r.out).toBe('EIO');
    // Told a size past 2^63 (what casting NaN or 2^70 to off_t gives), the kernel
    // would mark the file bad for good; an EIO answer leaves it usable.
    driver.bogus = null;
    expect((await pyOp('getattr', mountpoint)).out).toBe('ok');
  });
});

describe('vdisk unmount ends only vdisk mounts', () => {
  it('another FUSE filesystem (subtype other than vdisk) on the path is refused and stays mounted', async () => {
    const mountpoint = serve({}, 'notvdisk');
    expect(isMounted(mountpoint)).toBe(true);
    const r = await vdiskAsync(['unmount', mountpoint]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vdisk: error ERR_NOT_MOUNTED: .* is a fuse\.notvdisk mount, not vdisk's\n$/);
    expect(isMounted(mountpoint)).toBe(true);
    abortOf.get(mountpoint)?.();
  });
});
