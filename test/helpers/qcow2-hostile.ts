/**
 * Hostile qcow2 images for the bounded-cost tests: qemu-img makes a valid
 * image, then a few bytes are written into it where an attacker would.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { expect } from 'vitest';
import { CLI, sh } from './vdisk.js';

function ok(cmd: string): void {
  const r = sh(cmd);
  expect(r.status, `${cmd}\n${r.stderr}`).toBe(0);
}

/** Header fields read from the file. */
export function qcow2Header(image: string): { clusterBits: number; l1Size: number; l1Offset: number } {
  const fd = fs.openSync(image, 'r');
  try {
    const h = Buffer.alloc(48);
    fs.readSync(fd, h, 0, 48, 0);
    return { clusterBits: h.readUInt32BE(20), l1Size: h.readUInt32BE(36), l1Offset: Number(h.readBigUInt64BE(40)) };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A 33 MiB image (512-byte clusters, 128 GiB disk) whose 4M-entry L1 names
 * one L2 table in every entry. With `dirty`, the dirty bit and lazy refcounts
 * are set, so a writable open rebuilds the refcounts.
 */
export function sharedL2Image(dir: string, dirty = false): string {
  const image = path.join(dir, `shared-l2${dirty ? '-dirty' : ''}.qcow2`);
  ok(`qemu-img create -q -f qcow2 -o cluster_size=512${dirty ? ',lazy_refcounts=on' : ''} ${image} 128G`);
  ok(`qemu-io -c "write -P 0x11 0 512" ${image}`);
  const h = qcow2Header(image);
  expect(h.l1Size).toBe(4 * 1024 * 1024);
  const fd = fs.openSync(image, 'r+');
  try {
    const entry = Buffer.alloc(8);
    fs.readSync(fd, entry, 0, 8, h.l1Offset);
    expect(entry.readBigUInt64BE(0)).not.toBe(0n);
    const l1 = Buffer.alloc(h.l1Size * 8);
    for (let i = 0; i < h.l1Size; i++) entry.copy(l1, i * 8);
    fs.writeSync(fd, l1, 0, l1.length, h.l1Offset);
    if (dirty) {
      // incompatible_features bit 0: dirty.
      const f = Buffer.alloc(8);
      fs.readSync(fd, f, 0, 8, 72);
      f.writeBigUInt64BE(f.readBigUInt64BE(0) | 1n, 0);
      fs.writeSync(fd, f, 0, 8, 72);
    }
  } finally {
    fs.closeSync(fd);
  }
  return image;
}

/**
 * A zstd-compressed image whose first cluster is a frame declaring a 1.875 GiB
 * window (one RLE block of 64 KiB): small on disk, huge for a naive decoder.
 */
export function zstdWindowImage(dir: string): string {
  const raw = path.join(dir, 'zstd-src.raw');
  const image = path.join(dir, 'zstd-window.qcow2');
  ok(`qemu-img create -q -f raw ${raw} 1M && qemu-io -f raw -c "write -P 0x5a 0 1M" ${raw}`);
  ok(`qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=64k ${raw} ${image}`);
  const h = qcow2Header(image);
  const fd = fs.openSync(image, 'r+');
  try {
    const l1e = Buffer.alloc(8);
    fs.readSync(fd, l1e, 0, 8, h.l1Offset);
    const l2Offset = Number(l1e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const l2e = Buffer.alloc(8);
    fs.readSync(fd, l2e, 0, 8, l2Offset);
    const v = l2e.readBigUInt64BE(0);
    expect(v >> 62n & 1n, 'cluster 0 is compressed').toBe(1n);
    const x = BigInt(62 - (h.clusterBits - 8));
    const host = Number(v & ((1n << x) - 1n));
    const frame = Buffer.from([
      0x28, 0xb5, 0x2f, 0xfd, // magic
      0x00, // frame header descriptor: no single segment, no content size, no checksum, no dictionary
      (20 << 3) | 7, // window descriptor: 2^30 + 7 * 2^27 bytes
      // one last RLE block of 65536 bytes: (size << 3) | (type 1 << 1) | last
      ...(() => {
        const b = (65536 << 3) | (1 << 1) | 1;
        return [b & 0xff, (b >> 8) & 0xff, (b >> 16) & 0xff];
      })(),
      0x77, // the byte the block repeats
    ]);
    fs.writeSync(fd, frame, 0, frame.length, host);
  } finally {
    fs.closeSync(fd);
  }
  return image;
}

/** A 512-byte-cluster image with a little data, then extended (sparsely) to `size` bytes. */
export function extendedImage(dir: string, size: string): string {
  const image = path.join(dir, `extended-${size}.qcow2`);
  ok(`qemu-img create -q -f qcow2 -o cluster_size=512 ${image} 64M`);
  ok(`qemu-io -c "write -P 0x22 0 256k" ${image}`);
  ok(`truncate -s ${size} ${image}`);
  return image;
}

export interface MeasuredRun {
  status: number | null;
  stdout: string;
  stderr: string;
  /** Peak resident set size of the child, in bytes (from /usr/bin/time -v). */
  maxRss: number;
}

/**
 * Run the vdisk CLI under /usr/bin/time -v, with a V8 heap cap so that a
 * run-away old-code path dies early instead of eating the machine.
 */
export function vdiskMeasured(args: string[], options: { heapMb?: number; timeoutMs?: number } = {}): MeasuredRun {
  const r = spawnSync('/usr/bin/time', ['-v', process.execPath, `--max-old-space-size=${options.heapMb ?? 256}`, CLI, ...args], {
    encoding: 'utf8',
    timeout: options.timeoutMs ?? 120_000,
    maxBuffer: 64 * 1024 * 1024,
  });
  const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr ?? '');
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', maxRss: m ? Number(m[1]) * 1024 : Infinity };
}
