/**
 * Opening an image chain by name: the top image's format is probed (or
 * given), backing files are opened with the format their overlay names and
 * never probed into something else; loops and absurdly deep chains are
 * refused. Which format and protocol does what comes from the registry
 * (registry.ts); nothing here knows a format by name.
 */
import path from 'node:path';
import { BlockNode, type DetectZeroes, type DiscardMode } from '../block/node.js';
import type { HttpOptions } from './http/index.js';
import { displayName } from './http/url.js';
import { VdiskError } from '../errors.js';
import { PROBE_BYTES } from '../block/probe.js';
import { confineBacking, type BackingConfinement } from './backing-confine.js';
import { FORMATS, formatEntry, probeHead, protocolFor, requireFormat } from './registry.js';
import type { OpenedFormat, ProtocolEntry } from './entry.js';

/** Deeper chains than this are refused (QEMU allows far more, but nobody needs them). */
export const MAX_CHAIN_DEPTH = 32;

export interface OpenOptions {
  /** Format of the top image ('raw', 'qcow2'); probed from its first bytes when absent (a URL is raw). */
  format?: string;
  /**
   * Format of a backing file whose overlay records none. Without it such a
   * backing file is opened only if it probes as something other than raw
   * (a guest can write a qcow2 header into a raw disk).
   */
  backingFormat?: string;
  /** Open the top image read-only (backing images always are); writes then fail with EROFS. */
  readOnly?: boolean;
  /** Turn writes of all-zero data into write-zeroes ('unmap': and free the space). Default 'off'. */
  detectZeroes?: DetectZeroes;
  /** 'ignore': discards are dropped and write-zeroes never frees space. Default 'unmap'. */
  discard?: DiscardMode;
  /** qcow2: bytes of memory for cached L2 tables. */
  l2CacheBytes?: number;
  /** Copy what reads fetch from the backing chain into the top image; absent: as the image says (copy_on_read=on). */
  copyOnRead?: boolean;
  /** For http(s) images anywhere in the chain: headers, CA file, timeouts, retries. */
  http?: HttpOptions;
  /** Backing files must resolve inside this (resolved) directory (--backing-confine); remote ones need its allowRemote. */
  backingConfine?: BackingConfinement;
  /** Filled with messages worth showing a user (a corrupt bit set, refcounts repaired). */
  warnings?: string[];
}

/** The format named by the image's magic bytes; 'raw' when none matches or its protocol is never probed. */
export async function probeFormat(file: string, allowBlockDevice = false): Promise<string> {
  const protocol = protocolFor(file);
  if (!protocol.readHead) return 'raw';
  let head: Buffer;
  try {
    head = await protocol.readHead(file, PROBE_BYTES, allowBlockDevice);
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${displayName(file)}`);
    throw err;
  }
  return probeHead(head);
}

/**
 * Where a backing file name recorded in `overlay` (a local file: formats with
 * a backing file are not read remotely) points: URLs stay as they are,
 * relative names resolve against the overlay's directory.
 */
export function resolveBackingPath(overlay: string, name: string): string {
  if (protocolFor(name).schemes.length > 0) return name;
  return path.isAbsolute(name) ? name : path.resolve(path.dirname(overlay), name);
}

interface ChainState {
  seen: Set<string>;
  depth: number;
}

function remoteError(shown: string, protocol: ProtocolEntry): VdiskError {
  const names = FORMATS.filter((f) => f.capabilities.remote).map((f) => f.name);
  return new VdiskError('ERR_IMAGE_FORMAT', `${shown}: only ${names.join(', ')} images (and ISOs) can be read over ${protocol.name.toUpperCase()}`);
}

/**
 * `readOnly` is false only for the top of a chain: backing nodes are never written.
 * `probed`: the format came from probing the file, not from the user.
 */
async function openNode(file: string, format: string, options: OpenOptions, readOnly: boolean, chain: ChainState, probed = false): Promise<BlockNode> {
  const shown = displayName(file);
  const protocol = protocolFor(file);
  let real: string;
  try {
    real = await protocol.identity(file);
  } catch (err) {
    // Only a missing file is "not found": a permission problem or a symlink loop says what it is.
    const code = (err as { code?: string }).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${shown}`, { cause: err });
    if (code === 'EACCES' || code === 'EPERM') throw new VdiskError('EACCES', `cannot open ${shown}: permission denied`, { cause: err });
    throw new VdiskError('EIO', `cannot open ${shown}: ${(err as Error).message}`, { cause: err });
  }
  if (chain.seen.has(real)) throw new VdiskError('ERR_IMAGE_CORRUPT', `backing chain loops back to ${shown}`);
  if (chain.depth >= MAX_CHAIN_DEPTH) throw new VdiskError('ERR_IMAGE_CORRUPT', `backing chain deeper than ${MAX_CHAIN_DEPTH} at ${shown}`);
  chain.seen.add(real);
  // Remote images are opened read-only always (openImage, openBacking): writes need a local overlay on top.
  if (protocol.remote && !formatEntry(format)?.capabilities.remote) throw remoteError(shown, protocol);
  const entry = requireFormat(format, shown);
  const opened: OpenedFormat = await entry.open({
    location: file,
    shown,
    protocol,
    readOnly,
    // A block device only as the image the user named, never as a backing file (regular-file.ts).
    allowBlockDevice: chain.depth === 0,
    probed,
    l2CacheBytes: options.l2CacheBytes,
    http: options.http,
    probeHead,
  });
  options.warnings?.push(...(opened.warnings ?? []).map((w) => `${shown}: ${w}`));
  let backing: BlockNode | null = null;
  if (opened.backing) {
    try {
      backing = await openBacking(file, opened.backing.name, opened.backing.format, options, chain);
    } catch (err) {
      await opened.driver.close();
      throw err;
    }
  }
  const copyOnRead = !readOnly && backing !== null && (options.copyOnRead ?? opened.copyOnReadDefault ?? false);
  return new BlockNode(opened.driver, { name: shown, detectZeroes: options.detectZeroes ?? 'off', discard: options.discard ?? 'unmap', backing, copyOnRead });
}

async function openBacking(overlay: string, name: string, recordedFormat: string | null, options: OpenOptions, chain: ChainState): Promise<BlockNode> {
  let file = resolveBackingPath(overlay, name);
  const protocol = protocolFor(file);
  // Before anything reads the file (probing included).
  if (options.backingConfine) file = await confineBacking(overlay, name, file, protocol, options.backingConfine);
  let format = recordedFormat ?? options.backingFormat;
  if (!format && (protocol.remote || !protocol.readHead)) {
    throw new VdiskError('ERR_IMAGE_FORMAT', `${overlay} does not record the format of its backing ${displayName(file)}; give it explicitly (-F raw)`);
  }
  if (!format) {
    const probed = await probeFormat(file).catch((err: unknown) => {
      if ((err as { code?: string }).code === 'ERR_IMAGE_NOT_FOUND') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `backing file ${file} of ${overlay} not found`);
      throw err;
    });
    if (probed === 'raw') {
      throw new VdiskError(
        'ERR_IMAGE_FORMAT',
        `${overlay} does not record the format of its backing file ${name}, which probes as raw; give it explicitly (-F raw) if that is right`,
      );
    }
    format = probed;
  }
  chain.depth++;
  try {
    return await openNode(file, format, { ...options, backingFormat: undefined }, true, chain);
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_IMAGE_NOT_FOUND') {
      throw new VdiskError('ERR_IMAGE_NOT_FOUND', `backing file ${displayName(file)} of ${overlay} not found`);
    }
    throw err;
  }
}

/** Open an image (a path or a URL) as the top node of its chain. */
export async function openImage(file: string, options: OpenOptions = {}): Promise<BlockNode> {
  const protocol = protocolFor(file);
  // Remote images are never probed: raw unless said otherwise.
  const probed = options.format === undefined && !protocol.remote && protocol.readHead !== undefined;
  const format = options.format ?? (probed ? await probeFormat(file, true) : 'raw');
  // A remote image on its own is read-only (writes need a local overlay on top).
  return openNode(file, format, options, Boolean(options.readOnly) || protocol.remote, { seen: new Set(), depth: 0 }, probed);
}
