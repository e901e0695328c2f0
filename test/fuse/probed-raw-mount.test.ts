/**
 * A raw image mounted without -f: a guest writing a qcow2 header (naming a
 * host file as its backing) into sector 0 gets EPERM, so the next probed open
 * still sees raw and never serves the host file. -f raw writes anything.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { readImage } from '../helpers/image.js';
import { MiB, Mount, isMounted, sh, vdisk } from '../helpers/vdisk.js';

let dir: string;
useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

afterAll(() => {
  if (dir) for (const f of fs.readdirSync(dir)) if (isMounted(path.join(dir, f))) sh(`umount -l ${path.join(dir, f)}`);
});

function ok(command: string): string {
  const r = sh(command);
  expect(r.status, `${command}\n${r.stderr}`).toBe(0);
  return r.stdout;
}

/** A guest disk of random data, a host secret, and a qcow2 header (by qemu-img) naming the secret as its raw backing. */
function setup(name: string): { guest: string; original: Buffer; header: string; secret: string } {
  const guest = path.join(dir, `${name}.img`);
  ok(`head -c ${4 * MiB} /dev/urandom > ${guest}`);
  const secret = path.join(dir, `${name}-hostname`);
  fs.writeFileSync(secret, `secret-host-${name}\n`.padEnd(4096, '#'));
  const header = path.join(dir, `${name}-header.qcow2`);
  ok(`qemu-img create -q -f qcow2 -u -b ${secret} -F raw ${header} ${4 * MiB}`);
  return { guest, original: fs.readFileSync(guest), header, secret };
}

describe('a probed raw image', () => {
  it('refuses a qcow2 header written into sector 0 (EPERM), warns at mount, and the next probed open is still raw', async () => {
    const { guest, original, header, secret } = setup('probed');
    const mnt = path.join(dir, 'probed');
    const m = await Mount.start(guest, mnt);
    expect(m.stderr).toMatch(/vdisk: warning: \S+probed\.img: format probed as raw; .*refused \(EPERM\).*-f raw/);
    const dd = sh(`dd if=${header} of=${mnt} bs=512 count=1 conv=notrunc,fsync status=none`);
    expect(dd.status).not.toBe(0);
    expect(dd.stderr).toMatch(/Operation not permitted/);
    // The whole header in one write, as a guest copying the file would do it.
    expect(sh(`dd if=${header} of=${mnt} bs=64K conv=notrunc,fsync status=none`).stderr).toMatch(/Operation not permitted/);
    // Writes elsewhere, and ordinary data in sector 0, still work.
    expect(sh(`printf 'plain' | dd of=${mnt} bs=1 seek=0 conv=notrunc,fsync status=none`).status).toBe(0);
    expect(sh(`dd if=${header} of=${mnt} bs=512 count=1 seek=8 conv=notrunc,fsync status=none`).status).toBe(0);
    expect(await m.stop()).toBe(0);

    const now = fs.readFileSync(guest);
    const expected = Buffer.from(original);
    expected.write('plain', 0, 'latin1');
    fs.readFileSync(header).subarray(0, 512).copy(expected, 8 * 512);
    expect(now.equals(expected)).toBe(true);
    const info = vdisk(['info', '--output', 'json', guest]);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'raw', 'virtual-size': 4 * MiB });
    expect((await readImage(guest)).includes(fs.readFileSync(secret).subarray(0, 20))).toBe(false);
  });

  it('refuses a VMDK descriptor naming a host file in sector 0, which QEMU would probe and serve', async () => {
    const { guest, original, secret } = setup('vmdk');
    const descriptor = path.join(dir, 'vmdk-descriptor');
    fs.writeFileSync(descriptor, `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 8 FLAT "${secret}" 0\n`);
    // What the guest is after: on a plain copy, qemu-img probes the descriptor and reads the host file.
    const planted = path.join(dir, 'vmdk-planted.img');
    ok(`cp ${guest} ${planted} && dd if=${descriptor} of=${planted} conv=notrunc status=none`);
    expect(JSON.parse(ok(`qemu-img info --output=json ${planted}`))).toMatchObject({ format: 'vmdk' });
    const mnt = path.join(dir, 'vmdk');
    const m = await Mount.start(guest, mnt);
    const dd = sh(`dd if=${descriptor} of=${mnt} conv=notrunc,fsync status=none`);
    expect(dd.stderr).toMatch(/Operation not permitted/);
    expect(dd.status).not.toBe(0);
    expect(await m.stop()).toBe(0);
    expect(fs.readFileSync(guest).equals(original)).toBe(true);
    expect(JSON.parse(ok(`qemu-img info --output=json ${guest}`))).toMatchObject({ format: 'raw' });
  });

  it('with -f raw the same write goes through (no warning)', async () => {
    const { guest, header } = setup('given');
    const mnt = path.join(dir, 'given');
    const m = await Mount.start(guest, mnt, ['-f', 'raw']);
    expect(m.stderr).not.toMatch(/probed/);
    expect(sh(`dd if=${header} of=${mnt} bs=512 count=1 conv=notrunc,fsync status=none`).status).toBe(0);
    expect(await m.stop()).toBe(0);
    expect(fs.readFileSync(guest).subarray(0, 512).equals(fs.readFileSync(header).subarray(0, 512))).toBe(true);
  });

  it('an overlay that records no backing format does not reach the host file through a probed guest disk', async () => {
    const { guest, original, header, secret } = setup('overlaid');
    const overlay = path.join(dir, 'overlaid.qcow2');
    ok(`qemu-img create -q -f qcow2 -b ${guest} -F raw ${overlay}`);
    // qemu-img 7.2 always records the backing format: turn its extension into an unknown one.
    const img = fs.readFileSync(overlay);
    const extAt = img.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    expect(extAt).toBeGreaterThan(0);
    img.writeUInt32BE(0x12345678, extAt);
    fs.writeFileSync(overlay, img);

    // The guest's attempt, on the probed mount of its own disk, fails...
    const mnt = path.join(dir, 'overlaid');
    const m = await Mount.start(guest, mnt);
    expect(sh(`dd if=${header} of=${mnt} bs=64K conv=notrunc,fsync status=none`).stderr).toMatch(/Operation not permitted/);
    expect(await m.stop()).toBe(0);
    expect(fs.readFileSync(guest).equals(original)).toBe(true);
    // ...so the backing still probes as raw: refused without -F raw, and with it the guest's own data.
    const refused = vdisk(['info', overlay]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/^vdisk: error ERR_IMAGE_FORMAT: .*probes as raw.*-F raw/);
    const data = await readImage(overlay, { backingFormat: 'raw' });
    expect(data.equals(original)).toBe(true);
    expect(data.includes(fs.readFileSync(secret).subarray(0, 20))).toBe(false);
  });
});
