/** `vdisk mount`: serve an image as one file until Ctrl-C or `vdisk unmount`. */
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { openImage } from '../drivers/chain.js';
import { FuseExport } from '../export/fuse-export.js';
import { BlockNode } from '../block/node.js';
import { BlkdebugDriver, type BlkdebugOp, type BlkdebugRule } from '../drivers/blkdebug.js';
import { ERROR_TABLE, VdiskError, codeOf, type ErrorCode } from '../errors.js';
import { formatSize } from './util.js';
import { OPTION_NUMBERS, coerceWith, parseInteger, parseSize } from './numbers.js';
import fs from 'node:fs/promises';
import { imageStats } from '../stats.js';
import { displayName } from '../drivers/http/url.js';
import { ControlServer } from '../export/control.js';
import { checkMountpoint } from '../export/mountpoint.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';

/** Counters for --stats: the export's, copy-on-read's, and what HTTP backing nodes fetched. */
export function statsLine(exp: FuseExport, top: BlockNode): string {
  const s = exp.stats;
  const { copyOnRead: c, http } = imageStats(top);
  return (
    `reads=${s.reads} bytesRead=${s.bytesRead} writes=${s.writes} bytesWritten=${s.bytesWritten} errors=${s.errors} ` +
    `bytesFromBacking=${c.bytesFromBacking} bytesCopied=${c.bytesCopied} copyFailures=${c.copyFailures} httpRequests=${http.requests} httpBytesFetched=${http.bytesFetched}`
  );
}

const INJECT_OPS = ['read', 'write', 'zero', 'discard', 'flush', 'status'];

/** "read:EIO@1M+4096*2" -> a blkdebug rule. */
export function parseInjectRule(text: string): BlkdebugRule {
  const m = /^(\w+):(\w+)(?:@([^+*]+)(?:\+([^*]+))?)?(?:\*(\d+))?$/.exec(text);
  if (!m || !INJECT_OPS.includes(m[1]!) || !(m[2]! in ERROR_TABLE)) {
    throw new VdiskError('ERR_USAGE', `bad --inject '${text}' (form OP:CODE[@OFFSET[+BYTES]][*COUNT], e.g. read:EIO@1M+4096)`);
  }
  const rule: BlkdebugRule = { op: m[1] as BlkdebugOp, error: m[2] as ErrorCode };
  if (m[3] !== undefined) rule.offset = parseSize(m[3], `the offset of --inject '${text}'`);
  if (m[4] !== undefined) rule.bytes = parseSize(m[4], `the length of --inject '${text}'`, { min: 1, max: Number.MAX_SAFE_INTEGER });
  if (m[5] !== undefined) rule.count = parseInteger(m[5], `the count of --inject '${text}'`, { min: 1, max: Number.MAX_SAFE_INTEGER });
  return rule;
}

/** Put a blkdebug filter on top; per-node policy moves up with it. */
function withFaults(image: BlockNode, rules: BlkdebugRule[]): BlockNode {
  const top = new BlockNode(new BlkdebugDriver(image, rules), { name: image.name, detectZeroes: image.detectZeroes, discard: image.discard });
  image.detectZeroes = 'off';
  return top;
}

export interface MountArgs {
  image: string;
  mountpoint: string;
  format?: string;
  'backing-format'?: string;
  'l2-cache-size'?: number;
  'read-only': boolean;
  'allow-other': boolean;
  discard: 'ignore' | 'unmap';
  'detect-zeroes': 'off' | 'on' | 'unmap';
  'direct-io'?: boolean;
  'readahead-kb': number;
  stats: boolean;
  inject: BlkdebugRule[];
  'copy-on-read'?: boolean;
}

export function mountOptions(y: Argv): Argv<MountArgs & HttpArgs & ConfineArgs> {
  return withConfineOptions(withHttpOptions(y))
    .positional('image', { type: 'string', demandOption: true, describe: 'disk image to serve' })
    .positional('mountpoint', { type: 'string', demandOption: true, describe: 'an existing regular file; it shows the disk while mounted' })
    .option('format', { alias: 'f', type: 'string', choices: FORMAT_NAMES, describe: 'image format (probed when absent)' })
    .option('backing-format', { alias: 'F', type: 'string', choices: FORMAT_NAMES, describe: 'format of a backing file the image does not name (never probed as raw)' })
    .option('l2-cache-size', { type: 'string', coerce: coerceWith('--l2-cache-size', OPTION_NUMBERS.l2CacheBytes), describe: 'qcow2: memory for cached L2 tables (default 4M)' })
    .option('read-only', { alias: 'r', type: 'boolean', default: false, describe: 'refuse writes (EROFS); opens the image read-only' })
    .option('allow-other', { type: 'boolean', default: false, describe: 'let other users open the file (mode 0644 instead of 0600)' })
    .option('discard', { choices: ['ignore', 'unmap'] as const, default: 'unmap' as const, describe: 'unmap: punch-hole frees space in the image; ignore: it only writes zeroes' })
    .option('detect-zeroes', { choices: ['off', 'on', 'unmap'] as const, default: 'off' as const, describe: 'turn writes of all-zero data into write-zeroes (unmap: and free the space)' })
    .option('direct-io', {
      type: 'boolean',
      describe:
        'bypass the kernel page cache: every read reaches vdisk, shared mmap is refused (default: on with copy-on-read, whose overlay is cached by the kernel already; off otherwise)',
    })
    .option('readahead-kb', { type: 'string', default: 1024, coerce: coerceWith('--readahead-kb', OPTION_NUMBERS.readaheadKiB), describe: 'kernel readahead for the mount in KiB, 0 to 1048576 (root only)' })
    .option('stats', { type: 'boolean', default: false, describe: 'print request counters on exit (reads, bytes fetched from the backing chain, bytes copied into the overlay)' })
    .option('copy-on-read', {
      type: 'boolean',
      describe: 'copy what is read from the backing chain into the top image, so each block is fetched once (--no-copy-on-read: never; default: as the image says)',
    })
    .option('inject', {
      type: 'string',
      array: true,
      nargs: 1,
      default: [],
      // Parsed with the other options: a bad rule is refused before anything is opened.
      coerce: (rules: string[]) => rules.map(parseInjectRule),
      describe: 'fault injection for testing: OP:CODE[@OFFSET[+BYTES]][*COUNT], OP one of read|write|zero|discard|flush|status, e.g. read:EIO@1048576+4096',
    }) as unknown as Argv<MountArgs & HttpArgs & ConfineArgs>;
}

export async function runMount(args: MountArgs & HttpArgs & ConfineArgs): Promise<void> {
  const confine = confineFromArgs(args);
  // The mountpoint first: a clearer error than the image lock when it is mounted already.
  await checkMountpoint(args.mountpoint);
  const warnings: string[] = [];
  const image = await openImage(args.image, {
    readOnly: args['read-only'],
    detectZeroes: args['detect-zeroes'],
    discard: args.discard,
    warnings,
    ...imageOpenOptions(args),
    ...confine,
    l2CacheBytes: args['l2-cache-size'],
    copyOnRead: args['copy-on-read'],
  });
  if (args['copy-on-read'] && !image.copyOnRead) {
    warnings.push(image.backing ? 'copy-on-read needs a writable top image' : 'copy-on-read needs a backing file: nothing to copy');
  }
  for (const w of warnings) process.stderr.write(`vdisk: warning: ${w}\n`);
  // With copy-on-read, a page cache on the mounted file would hold a second copy of what
  // the overlay's page cache holds already, and filling it costs the first pass one more
  // copy of every byte (QEMU's FUSE export is always direct): measured 1.5x faster.
  const directIo = args['direct-io'] ?? image.copyOnRead;
  if (image.copyOnRead) {
    const how = directIo ? 'direct I/O; --no-direct-io keeps a page cache' : 'page cache on';
    process.stderr.write(`vdisk: copy-on-read: blocks read from ${image.backing!.name} are kept in ${image.name} (${how})\n`);
  }
  const node = args.inject.length ? withFaults(image, args.inject) : image;
  let exp: FuseExport;
  try {
    exp = await FuseExport.start(node, {
      mountpoint: args.mountpoint,
      readOnly: args['read-only'],
      allowOther: args['allow-other'],
      directIo,
      readaheadKiB: args['readahead-kb'],
    });
  } catch (err) {
    await node.close();
    throw err;
  }

  // Other vdisk commands (stream, jobs, job) reach this process through its control socket, named by the image or the mountpoint.
  let control: ControlServer | null = null;
  // Jobs (stream so far) need an image that can stop naming its backing file, opened writable.
  if (image.driver.changeBackingFile && !image.readOnly) {
    control = await ControlServer.start(image, [await fs.realpath(args.image), exp.mountpoint]).catch((err: unknown) => {
      process.stderr.write(`vdisk: warning: no control socket (${codeOf(err)}: ${(err as Error).message}); vdisk stream and vdisk jobs cannot reach this mount\n`);
      return null;
    });
  }

  let signals = 0;
  const onSignal = (signal: string) => {
    signals++;
    if (signals === 1) {
      process.stderr.write(`vdisk: ${signal}: unmounting ${args.mountpoint}; serving open files until they close (again to force)\n`);
      exp.stop(false).catch((err: unknown) => process.stderr.write(`vdisk: unmount: ${(err as Error).message}\n`));
    } else {
      process.stderr.write(`vdisk: ${signal}: forcing the unmount; open files get ENOTCONN\n`);
      exp.stop(true).catch(() => undefined);
    }
  };
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, () => onSignal(s));

  process.stderr.write(
    `vdisk: serving ${displayName(args.image)} (${node.driver.formatName}, ${formatSize(node.size())}${exp.node.readOnly || args['read-only'] ? ', read-only' : ''}) on ${exp.mountpoint}; Ctrl-C or 'vdisk unmount ${args.mountpoint}' stops\n`,
  );

  await exp.ended;
  await control?.close();
  await exp.close();
  await node.close();
  if (args.stats) process.stderr.write(`vdisk: stats ${statsLine(exp, image)}\n`);
  process.stderr.write(`vdisk: unmounted ${args.mountpoint}\n`);
}
