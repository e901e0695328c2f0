/** Mount lifecycle: Ctrl-C, vdisk unmount, a crashed server, I/O in flight at unmount, read-only. */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { MiB, Mount, isMounted, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;

function makeImage(name: string, size = 16 * MiB): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

useScratchDir({}, (d) => (dir = d));

afterAll(() => {
  if (dir) {
    for (const f of fs.readdirSync(dir)) {
      const p = path.join(dir, f);
      if (isMounted(p)) sh(`umount -l ${p}`);
    }
  }
});

describe('mount lifecycle', () => {
  it('Ctrl-C unmounts cleanly and exits 0, with written data in the image', async () => {
    const image = makeImage('ctrlc.img');
    const mnt = path.join(dir, 'ctrlc');
    const m = await Mount.start(image, mnt, ['--stats']);
    expect(isMounted(mnt)).toBe(true);
    expect(sh(`printf hello | dd of=${mnt} bs=1 seek=100 conv=notrunc status=none`).status).toBe(0);
    expect(await m.stop()).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    expect(m.stderr).toMatch(/vdisk: unmounted/);
    expect(m.stderr).toMatch(/writes=5 bytesWritten=5/);
    expect(fs.readFileSync(image).subarray(100, 105).toString()).toBe('hello');
  });

  it('vdisk unmount ends the server; a busy mount is refused unless --lazy', async () => {
    const image = makeImage('unmount.img');
    const mnt = path.join(dir, 'unmount');
    const m = await Mount.start(image, mnt);
    const fd = fs.openSync(mnt, 'r');
    const busy = vdisk(['unmount', mnt]);
    expect(busy.status).toBe(1);
    expect(busy.stderr).toMatch(/^vdisk: error EBUSY: .*busy/);
    fs.closeSync(fd);
    const r = vdisk(['unmount', mnt]);
    expect(r.status, r.stderr).toBe(0);
    expect(await m.exited).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    const again = vdisk(['unmount', mnt]);
    expect(again.status).toBe(1);
    expect(again.stderr).toMatch(/ERR_NOT_MOUNTED/);
  });

  it('a crashed server leaves a mount that vdisk unmount clears', async () => {
    const image = makeImage('crash.img');
    const mnt = path.join(dir, 'crash');
    const m = await Mount.start(image, mnt);
    m.proc.kill('SIGKILL');
    await m.exited;
    expect(isMounted(mnt)).toBe(true);
    expect(sh(`cat ${mnt}`).stderr).toMatch(/Transport endpoint is not connected/);
    const r = vdisk(['unmount', mnt]);
    expect(r.status, r.stderr).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    // And it can be mounted again.
    const m2 = await Mount.start(image, mnt);
    expect(await m2.stop()).toBe(0);
  });

  it('Ctrl-C with a writer still going: the mount is detached, the writer finishes, nothing fsynced is lost', async () => {
    const image = makeImage('inflight.img', 64 * MiB);
    const mnt = path.join(dir, 'inflight');
    const m = await Mount.start(image, mnt);
    const fifo = path.join(dir, 'feed');
    sh(`mkfifo ${fifo}`);
    // dd copies from the fifo in 1 MiB blocks and fsyncs at the end.
    const dd = spawn('dd', [`if=${fifo}`, `of=${mnt}`, 'bs=1M', 'iflag=fullblock', 'conv=notrunc,fsync', 'status=none']);
    const ddDone = new Promise<number | null>((resolve) => dd.on('exit', resolve));
    const data = Buffer.alloc(32 * MiB);
    for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
    const feed = fs.createWriteStream(fifo);
    await new Promise<void>((resolve) => feed.write(data.subarray(0, 16 * MiB), () => resolve()));
    // Half is written (or on its way): interrupt the server now.
    m.proc.kill('SIGINT');
    await new Promise<void>((resolve) => {
      const check = () => (m.stderr.includes('serving open files until they close') ? resolve() : setImmediate(check));
      m.proc.stderr!.on('data', check);
      check();
    });
    expect(m.proc.exitCode).toBe(null); // still serving the open file
    await new Promise<void>((resolve) => feed.end(data.subarray(16 * MiB), () => resolve()));
    expect(await ddDone).toBe(0);
    expect(await m.exited).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    expect(fs.readFileSync(image).subarray(0, 32 * MiB).equals(data)).toBe(true);
  });

  it('a read-only mount rejects writes and opens for writing', async () => {
    const image = makeImage('ro.img');
    fs.writeFileSync(image, Buffer.alloc(16 * MiB, 7));
    const mnt = path.join(dir, 'ro');
    const m = await Mount.start(image, mnt, ['--read-only']);
    expect(fs.statSync(mnt).mode & 0o777).toBe(0o400);
    const w = sh(`printf x | dd of=${mnt} conv=notrunc status=none`);
    expect(w.status).not.toBe(0);
    expect(w.stderr).toMatch(/Read-only file system/);
    expect(sh(`fallocate -p -o 0 -l 4096 ${mnt}`).status).not.toBe(0);
    expect(sh(`cmp ${mnt} ${image}`).status).toBe(0);
    expect(await m.stop()).toBe(0);
    expect(fs.readFileSync(image).every((b) => b === 7)).toBe(true);
  });

  it('I/O errors below the export reach the reader as EIO, and only for the failing range', async () => {
    const image = makeImage('eio.img');
    const mnt = path.join(dir, 'eio');
    const m = await Mount.start(image, mnt, ['--direct-io', '--inject', 'read:EIO@4M+4096', '--inject', 'write:ENOSPC@8M+1M']);
    const bad = sh(`dd if=${mnt} of=/dev/null bs=64K skip=64 count=1 status=none`);
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toMatch(/Input\/output error/);
    expect(sh(`dd if=${mnt} of=/dev/null bs=64K skip=65 count=16 status=none`).status).toBe(0);
    const full = sh(`head -c 65536 /dev/zero | tr '\\0' x | dd of=${mnt} bs=64K seek=128 conv=notrunc status=none`);
    expect(full.stderr).toMatch(/No space left on device/);
    expect(await m.stop()).toBe(0);
    expect(m.stderr).toMatch(/read failed: blkdebug: injected EIO/);
  });
});
