/** `vdisk mount`: serve an image as one file until Ctrl-C or `vdisk unmount`. */
import type { Argv } from 'yargs';
import { openImage } from '../block/open.js';
import { FuseExport } from '../export/fuse-export.js';
import { formatSize } from './util.js';

export interface MountArgs {
  image: string;
  mountpoint: string;
  format?: string;
  'read-only': boolean;
  'allow-other': boolean;
  discard: 'ignore' | 'unmap';
  'detect-zeroes': 'off' | 'on' | 'unmap';
  'direct-io': boolean;
  'readahead-kb': number;
  stats: boolean;
}

export function mountOptions(y: Argv): Argv<MountArgs> {
  return y
    .positional('image', { type: 'string', demandOption: true, describe: 'disk image to serve' })
    .positional('mountpoint', { type: 'string', demandOption: true, describe: 'an existing regular file; it shows the disk while mounted' })
    .option('format', { alias: 'f', type: 'string', choices: ['raw'], describe: 'image format (probed when absent)' })
    .option('read-only', { alias: 'r', type: 'boolean', default: false, describe: 'refuse writes (EROFS); opens the image read-only' })
    .option('allow-other', { type: 'boolean', default: false, describe: 'let other users open the file (mode 0644 instead of 0600)' })
    .option('discard', { choices: ['ignore', 'unmap'] as const, default: 'unmap' as const, describe: 'unmap: punch-hole frees space in the image; ignore: it only writes zeroes' })
    .option('detect-zeroes', { choices: ['off', 'on', 'unmap'] as const, default: 'off' as const, describe: 'turn writes of all-zero data into write-zeroes (unmap: and free the space)' })
    .option('direct-io', { type: 'boolean', default: false, describe: 'bypass the kernel page cache (every read reaches vdisk)' })
    .option('readahead-kb', { type: 'number', default: 1024, describe: 'kernel readahead for the mount in KiB (root only)' })
    .option('stats', { type: 'boolean', default: false, describe: 'print request counters on exit' }) as unknown as Argv<MountArgs>;
}

export async function runMount(args: MountArgs): Promise<void> {
  const openOptions = { readOnly: args['read-only'], detectZeroes: args['detect-zeroes'], discard: args.discard };
  const node = await openImage(args.image, args.format ? { ...openOptions, format: args.format } : openOptions);
  let exp: FuseExport;
  try {
    exp = await FuseExport.start(node, {
      mountpoint: args.mountpoint,
      readOnly: args['read-only'],
      allowOther: args['allow-other'],
      directIo: args['direct-io'],
      readaheadKiB: args['readahead-kb'],
    });
  } catch (err) {
    await node.close();
    throw err;
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
    `vdisk: serving ${args.image} (${node.driver.formatName}, ${formatSize(node.size())}${exp.node.readOnly || args['read-only'] ? ', read-only' : ''}) on ${exp.mountpoint}; Ctrl-C or 'vdisk unmount ${args.mountpoint}' stops\n`,
  );

  await exp.ended;
  await exp.close();
  await node.close();
  if (args.stats) {
    const s = exp.stats;
    process.stderr.write(`vdisk: stats reads=${s.reads} bytesRead=${s.bytesRead} writes=${s.writes} bytesWritten=${s.bytesWritten} errors=${s.errors}\n`);
  }
  process.stderr.write(`vdisk: unmounted ${args.mountpoint}\n`);
}
