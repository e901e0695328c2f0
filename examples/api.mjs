#!/usr/bin/env node
// vdisk as a library: a local qcow2 overlay with copy-on-read on a remote raw
// image. The first read of a range fetches it over HTTP and keeps it in the
// overlay; the second is answered from the overlay, with no HTTP request.
//
//   node examples/api.mjs URL [OFFSET [LENGTH]]
//   e.g. node examples/api.mjs https://example.org/disk.img 0 1048576
//
// Run from a checkout (after npm run build) or anywhere 'vdisk' is installed.
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { VdiskError, close, createImage, drain, imageStats, openImage, read } from 'vdisk';

const [url, offsetArg = '0', lengthArg = '1048576'] = process.argv.slice(2);
if (!url) {
  process.stderr.write('usage: node examples/api.mjs URL [OFFSET [LENGTH]]\n');
  process.exit(2);
}

/** The URL without user:password, which have no place in output. */
function shown(text) {
  try {
    const u = new URL(text);
    u.username = '';
    u.password = '';
    return u.href;
  } catch {
    return text;
  }
}

const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vdisk-api-'));
try {
  // The overlay records the URL and its format (a remote image is never probed).
  const overlay = path.join(dir, 'cache.qcow2');
  const made = await createImage(overlay, { format: 'qcow2', backingFile: url, backingFormat: 'raw' });
  const disk = await openImage(overlay, { copyOnRead: true });
  try {
    const offset = Number(offsetArg);
    const length = Math.min(Number(lengthArg), made.size - offset);
    console.log(`overlay ${overlay} on ${shown(url)} (raw, ${made.size} bytes)`);

    const data = await read(disk, offset, length);
    // Copies into the overlay may land after the read is answered: wait for them before counting.
    await drain(disk);
    console.log(`read ${length} bytes at ${offset}: sha256 ${createHash('sha256').update(data).digest('hex')}`);
    console.log(`after the first read:  ${JSON.stringify(imageStats(disk))}`);

    const again = await read(disk, offset, length);
    await drain(disk);
    if (!again.equals(data)) throw new Error('the second read differs from the first');
    console.log(`after the second read: ${JSON.stringify(imageStats(disk))}`);
  } finally {
    await close(disk);
  }
} catch (err) {
  // Every failure is a VdiskError with a stable code (see docs/ERRORS.md).
  const code = err instanceof VdiskError ? err.code : 'EIO';
  process.stderr.write(`api.mjs: error ${code}: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
} finally {
  await fs.rm(dir, { recursive: true, force: true });
}
