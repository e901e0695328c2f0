/** Reading an image through vdisk's block layer, and asking qemu-img about it. */
import { expect } from 'vitest';
import * as io from '../../src/block/io.js';
import { openImage, type OpenOptions } from '../../src/drivers/chain.js';
import type { MapEntry } from '../../src/cli/map.js';
import { sh } from './vdisk.js';

/** The whole virtual disk, read through vdisk's block layer (read-only open). */
export async function readImage(image: string, options: OpenOptions = {}): Promise<Buffer> {
  const node = await openImage(image, { readOnly: true, ...options });
  try {
    const buf = Buffer.alloc(node.size());
    await io.preadv(node, 0, buf.length, [buf]);
    return buf;
  } finally {
    await node.close();
  }
}

/**
 * `qemu-img ARGS`: its stdout, or a failed test that shows the command and what
 * qemu-img said (an unreadable image, "Unknown protocol 'http'" when the curl
 * module is missing) rather than an empty stdout for the caller to misread.
 */
export function qemuImg(args: string): string {
  const r = sh(`qemu-img ${args}`);
  expect(r.status, `qemu-img ${args} exited with ${r.status}:\n${r.stderr}`).toBe(0);
  return r.stdout;
}

/** Parse what a qemu tool printed as JSON; on failure say what it printed, stderr included. */
function parseJson<T>(what: string, r: { stdout: string; stderr: string }): T {
  try {
    return JSON.parse(r.stdout) as T;
  } catch (err) {
    throw new Error(`${what}: no JSON (${(err as Error).message}); stdout: ${r.stdout.slice(0, 500)} stderr: ${r.stderr}`);
  }
}

/** `qemu-img ARGS --output=json`, parsed; a failing qemu-img fails the test with its stderr. */
export function qemuImgJson<T>(args: string): T {
  const r = sh(`qemu-img ${args} --output=json`);
  expect(r.status, `qemu-img ${args} --output=json exited with ${r.status}:\n${r.stderr}`).toBe(0);
  return parseJson<T>(`qemu-img ${args}`, r);
}

/** vdisk map --output json prints qemu-img map's entries: one type for both. */
export type QemuMapEntry = MapEntry;

export function qemuImgMap(image: string): QemuMapEntry[] {
  return qemuImgJson<QemuMapEntry[]>(`map ${image}`);
}

export function qemuImgInfo(image: string): Record<string, unknown> & { 'virtual-size': number; format: string } {
  return qemuImgJson(`info ${image}`);
}

export interface QemuCheck {
  /** qemu-img check's exit status: 0 clean, 2 corruptions, 3 leaks (1 and 63 fail the helper). */
  status: number;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  /** What qemu-img printed, for failure messages. */
  output: string;
}

/**
 * `qemu-img check --output=json`, with absent counts as 0. An exit other than
 * 0, 2 or 3 (the check could not run or finish) fails the test with qemu-img's stderr.
 */
export function qemuImgCheck(image: string): QemuCheck {
  const r = sh(`qemu-img check --output=json ${image}`);
  const output = `qemu-img check ${image} exited with ${r.status}:\n${r.stdout}${r.stderr}`;
  expect([0, 2, 3], output).toContain(r.status);
  const j = parseJson<{ corruptions?: number; leaks?: number; 'check-errors'?: number }>(`qemu-img check ${image}`, r);
  return { status: r.status!, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, output };
}

/** qemu-img check completes and finds no corruption, no leak and no error, with exit status 0. */
export function expectQemuClean(image: string): void {
  const c = qemuImgCheck(image);
  expect({ status: c.status, corruptions: c.corruptions, leaks: c.leaks, checkErrors: c.checkErrors }, c.output).toEqual({ status: 0, corruptions: 0, leaks: 0, checkErrors: 0 });
}
