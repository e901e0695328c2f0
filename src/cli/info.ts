/** `vdisk info`: what an image is. */
import type { Argv } from 'yargs';
import { openImage, probeFormat } from '../block/open.js';
import { formatSize } from './util.js';

export interface InfoArgs {
  file: string;
  format?: string;
  output: 'human' | 'json';
}

export function infoOptions(y: Argv): Argv<InfoArgs> {
  return y
    .positional('file', { type: 'string', demandOption: true })
    .option('format', { alias: 'f', type: 'string', choices: ['raw'], describe: 'image format (probed when absent)' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const }) as unknown as Argv<InfoArgs>;
}

export async function runInfo(args: InfoArgs): Promise<void> {
  const format = args.format ?? (await probeFormat(args.file));
  const node = await openImage(args.file, { format, readOnly: true });
  try {
    const info = {
      filename: args.file,
      format: node.driver.formatName,
      'virtual-size': node.size(),
      'actual-size': (await node.driver.allocatedBytes?.()) ?? node.size(),
    };
    if (args.output === 'json') {
      process.stdout.write(`${JSON.stringify(info, null, 2)}\n`);
    } else {
      process.stdout.write(
        `image: ${info.filename}\nfile format: ${info.format}\nvirtual size: ${formatSize(info['virtual-size'])} (${info['virtual-size']} bytes)\ndisk size: ${formatSize(info['actual-size'])}\n`,
      );
    }
  } finally {
    await node.close();
  }
}
