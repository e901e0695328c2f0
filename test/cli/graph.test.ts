/**
 * The block graph as users and jobs see it: `vdisk info --backing-chain
 * --output json` lists each node's children with their roles, and
 * changeBackingFile rewrites the backing file a qcow2 image records (checked
 * by qemu-img) and relinks the graph. Images are made by qemu-img.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { qemuImgInfo } from '../helpers/image.js';
import { MiB, sh, vdisk } from '../helpers/vdisk.js';
import { openImage } from '../../src/drivers/chain.js';
import { changeBackingFile, reopen } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import { FileDriver } from '../../src/drivers/file.js';
import { FORMAT_NAMES } from '../../src/drivers/registry.js';

let dir: string;
useScratchDir({ tools: { 'qemu-img': 'qemu-utils' } }, (d) => (dir = d));

function ok(command: string): void {
  const r = sh(command);
  expect(r.status, `${command}\n${r.stderr}`).toBe(0);
}

describe('the block graph', () => {
  it('info --backing-chain --output json shows each node\'s children with their roles', () => {
    ok(`cd ${dir} && head -c ${MiB} /dev/urandom > base.img && qemu-img create -q -f qcow2 -b base.img -F raw mid.qcow2 && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2`);
    const r = vdisk(['info', '--backing-chain', '--output', 'json', path.join(dir, 'top.qcow2')]);
    expect(r.status, r.stderr).toBe(0);
    const infos = JSON.parse(r.stdout) as Array<{ filename: string; children: Array<{ role: string; filename: string; format: string }> }>;
    const top = path.join(dir, 'top.qcow2');
    const mid = path.join(dir, 'mid.qcow2');
    const base = path.join(dir, 'base.img');
    expect(infos.map((i) => i.filename)).toEqual([top, mid, base]);
    expect(infos[0]!.children).toEqual([
      { role: 'file', filename: top, format: 'raw' },
      { role: 'backing', filename: mid, format: 'qcow2' },
    ]);
    expect(infos[1]!.children).toEqual([
      { role: 'file', filename: mid, format: 'raw' },
      { role: 'backing', filename: base, format: 'raw' },
    ]);
    expect(infos[2]!.children).toEqual([]);
  });

  it('changeBackingFile records a new backing file (qemu-img reads it) and relinks the node', async () => {
    ok(`cd ${dir} && head -c ${MiB} /dev/zero > a.img && head -c ${MiB} /dev/zero > b.img && qemu-img create -q -f qcow2 -b a.img -F raw ov.qcow2`);
    const top = await openImage(path.join(dir, 'ov.qcow2'));
    const b = await openImage(path.join(dir, 'b.img'), { format: 'raw', readOnly: true });
    const old = await changeBackingFile(top, 'b.img', 'raw', b);
    expect(old?.name).toBe(path.join(dir, 'a.img'));
    await old?.close();
    expect(top.backing).toBe(b);
    await top.close();
    const info = qemuImgInfo(path.join(dir, 'ov.qcow2'));
    expect(info['backing-filename']).toBe('b.img');
    expect(info['backing-filename-format']).toBe('raw');
    ok(`qemu-img check -q ${path.join(dir, 'ov.qcow2')}`);
  });

  it('a backing file name too long for the header cluster is refused and leaves the image as it was', async () => {
    ok(`cd ${dir} && qemu-img create -q -f qcow2 -o cluster_size=512 -b a.img -F raw small.qcow2`);
    const top = await openImage(path.join(dir, 'small.qcow2'));
    const b = await openImage(path.join(dir, 'b.img'), { format: 'raw', readOnly: true });
    await expect(changeBackingFile(top, 'x'.repeat(600), 'raw', b)).rejects.toMatchObject({ code: 'EINVAL' });
    expect(top.backing?.name).toBe(path.join(dir, 'a.img'));
    await b.close();
    await top.close();
    expect(qemuImgInfo(path.join(dir, 'small.qcow2'))['backing-filename']).toBe('a.img');
  });

  it('the format choices of every command come from the registry', () => {
    for (const cmd of ['mount', 'info', 'map', 'create', 'stream']) {
      const help = vdisk([cmd, '--help']).stdout;
      expect(help, cmd).toContain(`[choices: ${FORMAT_NAMES.map((f) => `"${f}"`).join(', ')}]`);
    }
    const r = vdisk(['info', '-f', 'vmdk', path.join(dir, 'a.img')]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/Choices: "raw", "qcow2"/);
  });

  it('reopens a file node read-write (taking the writer lock) and back to read-only', async () => {
    const file = path.join(dir, 'reopen.img');
    ok(`head -c ${MiB} /dev/zero > ${file}`);
    const node = await openImage(file, { format: 'raw', readOnly: true });
    await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 7)])).rejects.toMatchObject({ code: 'EROFS' });
    await reopen(node, false);
    // The one-writer lock is held now: a second writer is refused.
    await expect(FileDriver.open(file)).rejects.toMatchObject({ code: 'EBUSY' });
    await io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 7)]);
    await reopen(node, true);
    await expect(io.pwritev(node, 0, 4096, [Buffer.alloc(4096, 8)])).rejects.toMatchObject({ code: 'EROFS' });
    await (await FileDriver.open(file)).close();
    await node.close();
    expect(fs.readFileSync(file).subarray(0, 4096).every((b) => b === 7)).toBe(true);
  });
});
