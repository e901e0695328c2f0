/**
 * A reader that stops early (`vdisk map img | head -1`) closes the pipe under
 * vdisk: the rest of the output is dropped without a stack trace, and the exit
 * status is the command's own (Node's default was an unhandled EPIPE crash).
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect, it } from 'vitest';
import { useScratchDir } from '../helpers/env.js';
import { CLI, sh } from '../helpers/vdisk.js';

let dir: string;
useScratchDir({ fuse: false }, (d) => (dir = d));

it('vdisk map | head -1: no EPIPE crash, exit 0, nothing on stderr', () => {
  // 4000 data ranges with holes between them: far more output than a pipe buffers.
  const image = path.join(dir, 'striped.img');
  const fd = fs.openSync(image, 'w');
  const block = Buffer.alloc(4096, 0x5a);
  for (let i = 0; i < 4000; i++) fs.writeSync(fd, block, 0, block.length, i * 8192);
  fs.closeSync(fd);
  const r = sh(`bash -c 'node ${CLI} map -f raw ${image} 2>${dir}/stderr | head -1; echo "status=\${PIPESTATUS[0]}"'`);
  expect(r.stdout).toMatch(/^Offset .*\nstatus=0\n$/);
  expect(fs.readFileSync(path.join(dir, 'stderr'), 'utf8')).toBe('');
});
