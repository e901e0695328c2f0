/**
 * --backing-confine: for services that open images their users supply, where
 * an overlay's backing file name (../../etc/shadow, a symlink, a URL) is the
 * user's to choose. A backing file must resolve, symlinks followed, inside the
 * given directory; remote ones (URLs) are refused unless allowed. Checked in openBacking() (chain.ts),
 * before the file is probed or opened, and the resolved path is what is opened.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { displayUrl } from './http/url.js';
import type { ProtocolEntry } from './entry.js';
import { VdiskError } from '../errors.js';

export interface BackingConfinement {
  /** The directory, as realpath() gives it. */
  dir: string;
  /** Backing files at http(s) URLs are allowed too. */
  allowRemote: boolean;
}

function inside(dir: string, file: string): boolean {
  return file === dir || file.startsWith(dir.endsWith('/') ? dir : `${dir}/`);
}

/**
 * The path to open for the backing file `file` of `overlay`, or an
 * ERR_BACKING_CONFINED error. Messages never say where an outside path leads
 * (whether a file outside exists is none of the image supplier's business).
 */
export async function confineBacking(overlay: string, name: string, file: string, protocol: ProtocolEntry, confine: BackingConfinement): Promise<string> {
  if (protocol.remote) {
    if (confine.allowRemote) return file;
    throw new VdiskError('ERR_BACKING_CONFINED', `${overlay}: backing file ${displayUrl(file)} is remote; refused by --backing-confine (--allow-remote allows URLs)`);
  }
  let real: string;
  try {
    real = await fs.realpath(file);
  } catch {
    // Missing: outside is refused as outside, inside is simply not there.
    if (!inside(confine.dir, path.resolve(file))) real = path.resolve(file);
    else throw new VdiskError('ERR_IMAGE_NOT_FOUND', `backing file ${name} of ${overlay} not found`);
  }
  if (!inside(confine.dir, real)) {
    throw new VdiskError('ERR_BACKING_CONFINED', `${overlay}: backing file ${name} resolves outside ${confine.dir} (--backing-confine)`);
  }
  return real;
}
