/**
 * A block device is an image when the user names it (its size from
 * lseek(SEEK_END), a writable one opened O_EXCL), never as a backing file that
 * an image names: /dev/sda behind someone's overlay would serve the host disk.
 * Loop devices over files in the scratch directory stand in for disks (needs
 * root and losetup, from util-linux).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { Mount, MiB, randomFile, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;
useScratchDir({ tools: { losetup: 'mount', 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

const loops: string[] = [];
afterAll(() => {
  for (const dev of loops) sh(`losetup -d ${dev}`);
});

/** A loop device over a new file of `bytes` random bytes; returns the device and the data. */
function loopDevice(name: string, bytes: number): { dev: string; data: Buffer; file: string } {
  const file = path.join(dir, name);
  const data = randomFile(file, bytes);
  const r = sh(`losetup --find --show ${file}`);
  if (r.status !== 0) throw new Error(`losetup failed (the test needs root and loop devices): ${r.stderr}`);
  const dev = r.stdout.trim();
  loops.push(dev);
  return { dev, data, file };
}

describe('a block device as the image', () => {
  it('info reports its real size (fstat says 0), and a mount reads and writes it', async () => {
    const { dev, data, file } = loopDevice('disk.raw', 3 * MiB);
    const info = vdisk(['info', '--output', 'json', dev]);
    expect(info.stderr).toBe('');
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'raw', 'virtual-size': 3 * MiB });

    const mp = path.join(dir, 'disk.mnt');
    const m = await Mount.start(dev, mp, ['-f', 'raw']);
    expect(fs.statSync(mp).size).toBe(3 * MiB);
    expect(fs.readFileSync(mp).equals(data)).toBe(true);
    const patch = Buffer.alloc(4096, 0xa5);
    const fd = fs.openSync(mp, 'r+');
    fs.writeSync(fd, patch, 0, patch.length, MiB);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    expect(await m.stop()).toBe(0);
    sh(`blockdev --flushbufs ${dev}`);
    expect(fs.readFileSync(file).subarray(MiB, MiB + 4096).equals(patch)).toBe(true);
  });

  it('a qcow2 image on a block device opens and reads (qemu-img wrote it there)', () => {
    const { dev } = loopDevice('qcow2-disk', 4 * MiB);
    expect(sh(`qemu-img create -q -f qcow2 ${dev} 1M && qemu-io -c 'write -P 0x3c 0 64k' ${dev}`).status).toBe(0);
    const info = vdisk(['info', '--output', 'json', dev]);
    expect(info.stderr).toBe('');
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': MiB });
    expect(vdisk(['check', dev]).status).toBe(0);
  });

  it('a block device named as a backing file by an image is refused with one line', () => {
    const { dev } = loopDevice('secret-disk', MiB);
    const overlay = path.join(dir, 'hostile.qcow2');
    expect(sh(`qemu-img create -q -f qcow2 -b ${dev} -F raw ${overlay}`).status).toBe(0);
    for (const cmd of [['info', overlay], ['map', overlay]]) {
      const r = vdisk(cmd);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^vdisk: error ERR_NOT_A_FILE: ${dev} is a block device; [^\\n]*command line[^\\n]*\\n$`));
    }
  });
});
