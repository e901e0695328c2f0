/**
 * Opening an image chain by file name: the top image's format is probed (or
 * given), backing files are opened with the format their overlay names and
 * never probed into something else; loops and absurdly deep chains are refused.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { BlockNode, type DetectZeroes, type DiscardMode } from './node.js';
import { FileDriver } from '../drivers/file.js';
import { ProbedRawDriver } from '../drivers/probed-raw.js';
import { readFileHead } from '../drivers/regular-file.js';
import { HttpDriver, type HttpOptions } from '../drivers/http/index.js';
import { displayName, displayUrl, isHttpUrl } from '../drivers/http/url.js';
import { Qcow2Driver } from '../drivers/qcow2/index.js';
import { VdiskError } from '../errors.js';
import { PROBE_BYTES, probeHead } from './probe.js';
import { confineBacking, type BackingConfinement } from './backing-confine.js';

export const SUPPORTED_FORMATS = ['raw', 'qcow2'] as const;
/** Deeper chains than this are refused (QEMU allows far more, but nobody needs them). */
export const MAX_CHAIN_DEPTH = 32;

export interface OpenOptions {
  /** Format of the image; probed from its first bytes when absent. */
  format?: string;
  /**
   * Format of a backing file whose overlay records none. Without it such a
   * backing file is opened only if it probes as something other than raw
   * (a guest can write a qcow2 header into a raw disk).
   */
  backingFormat?: string;
  readOnly?: boolean;
  detectZeroes?: DetectZeroes;
  discard?: DiscardMode;
  l2CacheBytes?: number;
  /** Copy-on-read on the top node; absent: what the image asks for (copy_on_read=on). */
  copyOnRead?: boolean;
  /** For http(s) images anywhere in the chain. */
  http?: HttpOptions;
  /** Backing files must resolve inside this directory (--backing-confine); URLs need its allowRemote. */
  backingConfine?: BackingConfinement;
  /** Messages worth showing the user (corrupt bit, repaired refcounts). */
  warnings?: string[];
}

/** The format named by the image's magic bytes; 'raw' when none matches. */
export async function probeFormat(file: string, allowBlockDevice = false): Promise<string> {
  let head: Buffer;
  try {
    head = await readFileHead(file, PROBE_BYTES, allowBlockDevice);
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${displayName(file)}`);
    throw err;
  }
  return probeHead(head);
}

/**
 * Where a backing file name recorded in `overlay` (a local file: only raw
 * images are read over HTTP) points: URLs stay as they are, relative names
 * resolve against the overlay's directory.
 */
export function resolveBackingPath(overlay: string, name: string): string {
  if (isHttpUrl(name)) return name;
  return path.isAbsolute(name) ? name : path.resolve(path.dirname(overlay), name);
}

interface ChainState {
  seen: Set<string>;
  depth: number;
}

/**
 * `readOnly` is false only for the top of a chain: backing nodes are never written.
 * `probed`: the format came from probing the file, not from the user.
 */
async function openNode(file: string, format: string, options: OpenOptions, readOnly: boolean, chain: ChainState, probed = false): Promise<BlockNode> {
  const shown = displayName(file);
  let real: string;
  if (isHttpUrl(file)) {
    real = file;
  } else {
    try {
      real = await fs.realpath(file);
    } catch {
      throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${displayName(file)}`);
    }
  }
  if (chain.seen.has(real)) throw new VdiskError('ERR_IMAGE_CORRUPT', `backing chain loops back to ${shown}`);
  if (chain.depth >= MAX_CHAIN_DEPTH) throw new VdiskError('ERR_IMAGE_CORRUPT', `backing chain deeper than ${MAX_CHAIN_DEPTH} at ${shown}`);
  chain.seen.add(real);
  // A block device only as the image the user named, never as a backing file (regular-file.ts).
  const allowBlockDevice = chain.depth === 0;
  const nodeOptions = { name: shown, detectZeroes: options.detectZeroes ?? 'off', discard: options.discard ?? 'unmap' } as const;
  if (isHttpUrl(file)) {
    // Opened read-only always (openImage, openBacking): writes need a qcow2 overlay on top.
    if (format !== 'raw') throw new VdiskError('ERR_IMAGE_FORMAT', `${shown}: only raw images (and ISOs) can be read over HTTP`);
    return new BlockNode(await HttpDriver.open(file, options.http ?? {}), nodeOptions);
  }
  switch (format) {
    case 'raw': {
      const drv = await FileDriver.open(file, { readOnly, allowBlockDevice });
      if (!probed || readOnly) return new BlockNode(drv, nodeOptions);
      options.warnings?.push(
        `${shown}: format probed as raw; writes that would make its first sector probe as another format are refused (EPERM). Give -f raw to lift the restriction`,
      );
      return new BlockNode(new ProbedRawDriver(drv, shown), nodeOptions);
    }
    case 'qcow2': {
      const fileNode = new BlockNode(await FileDriver.open(file, { readOnly, growable: true, allowBlockDevice }), { name: file });
      let drv: Qcow2Driver;
      try {
        drv = await Qcow2Driver.open(fileNode, readOnly ? { readOnly } : { readOnly, ...(options.l2CacheBytes ? { l2CacheBytes: options.l2CacheBytes } : {}) });
      } catch (err) {
        await fileNode.close();
        throw err;
      }
      options.warnings?.push(...drv.warnings.map((w) => `${file}: ${w}`));
      const h = drv.header;
      if (h.backingFile !== null) {
        try {
          drv.backing = await openBacking(file, h.backingFile, h.backingFormat, options, chain);
        } catch (err) {
          await drv.close();
          throw err;
        }
      }
      const copyOnRead = !readOnly && Boolean(drv.backing) && (options.copyOnRead ?? drv.copyOnReadDefault);
      return new BlockNode(drv, { ...nodeOptions, backing: drv.backing, copyOnRead });
    }
    default:
      throw new VdiskError('ERR_IMAGE_FORMAT', `${file}: format '${format}' is not supported (supported: ${SUPPORTED_FORMATS.join(', ')})`);
  }
}

async function openBacking(overlay: string, name: string, recordedFormat: string | null, options: OpenOptions, chain: ChainState): Promise<BlockNode> {
  let file = resolveBackingPath(overlay, name);
  // Before anything reads the file (probing included).
  if (options.backingConfine) file = await confineBacking(overlay, name, file, options.backingConfine);
  let format = recordedFormat ?? options.backingFormat;
  if (!format && isHttpUrl(file)) {
    throw new VdiskError('ERR_IMAGE_FORMAT', `${overlay} does not record the format of its backing ${displayUrl(file)}; give it explicitly (-F raw)`);
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

/** Open an image file as the top node of its chain. */
export async function openImage(file: string, options: OpenOptions = {}): Promise<BlockNode> {
  // URLs are never probed: a remote image is raw unless said otherwise.
  const probed = options.format === undefined && !isHttpUrl(file);
  const format = options.format ?? (probed ? await probeFormat(file, true) : 'raw');
  // A remote image on its own is read-only (writes need a qcow2 overlay on top).
  return openNode(file, format, options, Boolean(options.readOnly) || isHttpUrl(file), { seen: new Set(), depth: 0 }, probed);
}

/** The nodes of a chain, top first. */
export function chainOf(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | null = top; n; n = n.backing) out.push(n);
  return out;
}
