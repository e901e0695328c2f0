/** `vdisk create`: make a new, sparse image. */
import fs from 'node:fs/promises';
import type { Argv } from 'yargs';
import { VdiskError } from '../errors.js';
import { parseSize, formatSize } from './util.js';

export interface CreateArgs {
  file: string;
  size: string;
  format: string;
  force: boolean;
}

export function createOptions(y: Argv): Argv<CreateArgs> {
  return y
    .positional('file', { type: 'string', demandOption: true, describe: 'image file to create' })
    .positional('size', { type: 'string', demandOption: true, describe: 'virtual size: bytes, or with K/M/G/T (binary) suffix' })
    .option('format', { alias: 'f', choices: ['raw'], default: 'raw', describe: 'image format' })
    .option('force', { type: 'boolean', default: false, describe: 'replace an existing file' }) as unknown as Argv<CreateArgs>;
}

export async function runCreate(args: CreateArgs): Promise<void> {
  const size = parseSize(args.size);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(args.file, args.force ? 'w' : 'wx');
  } catch (err) {
    if ((err as { code?: string }).code === 'EEXIST') throw new VdiskError('EEXIST', `${args.file} exists (use --force to replace it)`);
    throw err;
  }
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  process.stdout.write(`Formatting '${args.file}', fmt=${args.format} size=${size} (${formatSize(size)})\n`);
}
