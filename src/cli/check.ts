/** `vdisk check`: refcount consistency, leaks and corruptions of a qcow2 image; optional repair. */
import type { Argv } from 'yargs';
import { openImage } from '../drivers/chain.js';
import type { RepairMode } from '../block/driver.js';
import { VdiskError } from '../errors.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';

export interface CheckArgs {
  file: string;
  repair?: 'leaks' | 'all';
  output: 'human' | 'json';
}

export function checkOptions(y: Argv): Argv<CheckArgs & ConfineArgs> {
  return withConfineOptions(y)
    .positional('file', { type: 'string', demandOption: true })
    .option('repair', { alias: 'r', choices: ['leaks', 'all'] as const, describe: 'fix leaked clusters, or everything that can be fixed' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const })
    .epilogue('Exit status: 0 no problems, 2 corruptions remain, 3 only leaks remain (as qemu-img check).') as unknown as Argv<CheckArgs & ConfineArgs>;
}

export async function runCheck(args: CheckArgs & ConfineArgs): Promise<void> {
  const repair: RepairMode = args.repair ?? 'none';
  const node = await openImage(args.file, { format: 'qcow2', readOnly: repair === 'none', ...confineFromArgs(args) });
  try {
    // qcow2 is the one format with a check today; the capability, not the class, is what is asked.
    if (!node.driver.check) throw new VdiskError('ERR_IMAGE_FORMAT', `vdisk check does not know how to check ${node.driver.formatName} images`);
    const r = await node.driver.check(repair);
    const corruptionsLeft = r.corruptions - r.corruptionsFixed;
    const leaksLeft = r.leaks - r.leaksFixed;
    if (args.output === 'json') {
      process.stdout.write(
        `${JSON.stringify(
          {
            filename: args.file,
            format: 'qcow2',
            'check-errors': 0,
            corruptions: corruptionsLeft,
            leaks: leaksLeft,
            'corruptions-fixed': r.corruptionsFixed,
            'leaks-fixed': r.leaksFixed,
            'image-end-offset': r.imageEndOffset,
            'total-clusters': r.totalClusters,
            'allocated-clusters': r.allocatedClusters,
            messages: r.messages,
          },
          null,
          2,
        )}\n`,
      );
    } else {
      for (const m of r.messages) process.stdout.write(`${m}\n`);
      if (r.leaksFixed || r.corruptionsFixed) process.stdout.write(`Repaired ${r.leaksFixed} leaks and ${r.corruptionsFixed} corruptions.\n`);
      if (corruptionsLeft) process.stdout.write(`\n${corruptionsLeft} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
      if (leaksLeft) process.stdout.write(`\n${leaksLeft} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
      if (!corruptionsLeft && !leaksLeft) process.stdout.write('No errors were found on the image.\n');
      process.stdout.write(`${r.allocatedClusters}/${r.totalClusters} = ${((100 * r.allocatedClusters) / Math.max(1, r.totalClusters)).toFixed(2)}% allocated\nImage end offset: ${r.imageEndOffset}\n`);
    }
    process.exitCode = corruptionsLeft ? 2 : leaksLeft ? 3 : 0;
  } finally {
    await node.close();
  }
}
