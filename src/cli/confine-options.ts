/** --backing-confine and --allow-remote, for every command that opens an image chain. */
import fs from 'node:fs';
import type { Argv } from 'yargs';
import type { OpenOptions } from '../drivers/chain.js';
import { VdiskError } from '../errors.js';

export interface ConfineArgs {
  'backing-confine'?: string;
  'allow-remote': boolean;
}

export function withConfineOptions<T>(y: Argv<T>): Argv<T & ConfineArgs> {
  return y
    .option('backing-confine', {
      type: 'string',
      describe: 'refuse any backing file that resolves (symlinks followed) outside this directory, and remote ones (for images other people supply)',
    })
    .option('allow-remote', { type: 'boolean', default: false, describe: 'with --backing-confine: allow http(s) backing files too' }) as unknown as Argv<T & ConfineArgs>;
}

/** The confinement for openImage(); checked here, before any image is opened. */
export function confineFromArgs(args: ConfineArgs): Pick<OpenOptions, 'backingConfine'> {
  const dir = args['backing-confine'];
  if (dir === undefined) return {};
  let real: string;
  try {
    real = fs.realpathSync(dir);
  } catch {
    throw new VdiskError('ERR_USAGE', `--backing-confine: ${dir} does not exist`);
  }
  if (!fs.statSync(real).isDirectory()) throw new VdiskError('ERR_USAGE', `--backing-confine: ${dir} is not a directory`);
  return { backingConfine: { dir: real, allowRemote: args['allow-remote'] } };
}
