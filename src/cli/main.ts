#!/usr/bin/env node
/** The vdisk command line. */
import v8 from 'node:v8';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { VdiskError } from '../errors.js';
import { checkOptions, runCheck } from './check.js';
import { createOptions, runCreate } from './create.js';
import { infoOptions, runInfo } from './info.js';
import { mapOptions, runMap } from './map.js';
import { mountOptions, runMount } from './mount.js';
import { runUnmount, unmountOptions } from './unmount.js';
import { runStream, streamOptions } from './stream.js';
import { jobOptions, jobsOptions, runJob, runJobs } from './jobs.js';
import { exitCodeOf, reportError } from './util.js';

/**
 * Streaming through vdisk allocates a 64 KiB ArrayBuffer for every socket
 * read, and V8 counts that memory against its full-GC trigger, which it sets
 * at only a few times the (small, ~12 MB) live heap: a 1 GiB copy-on-read pass
 * ran 40-80 full GCs. A growing factor of 11 instead of V8's ~2 leaves about
 * one every 64 MiB (V8's own external-memory step): 16. Measured on that pass:
 * 522-641 -> 753-789 MB/s, and a quarter less CPU. The process's own heap stays
 * small; the price is that garbage may pile up to 11x the live heap (~130 MB)
 * between collections. The command line only: a library must not change
 * process-wide flags.
 */
v8.setFlagsFromString('--heap-growing-percent=1000');

async function main(argv: string[]): Promise<void> {
  await yargs(argv)
    .scriptName('vdisk')
    .usage('$0 <command> [options]\n\nMount a virtual disk image as one regular file through FUSE.')
    .command('mount <image> <mountpoint>', 'serve an image as one file until Ctrl-C or `vdisk unmount`', mountOptions, runMount)
    .command('unmount <mountpoint>', 'unmount a vdisk mount (also one left by a crashed process)', unmountOptions, runUnmount)
    .command('create <file> [size]', 'create a new image (raw, or qcow2 with an optional backing file)', createOptions, runCreate)
    .command('info <file>', 'show format, virtual size and disk usage of an image', infoOptions, runInfo)
    .command('map <file>', 'show which ranges hold data or read as zero, and which image of the chain has them', mapOptions, runMap)
    .command('stream <image>', 'copy into a qcow2 image everything it still takes from its backing chain (resumable)', streamOptions, runStream)
    .command('jobs <target>', 'list the jobs of a mount (named by its image or mountpoint): id, type, state, progress, error', jobsOptions, runJobs)
    .command('job <action> <id>', 'pause, resume, cancel or complete a job of a mount', jobOptions, runJob)
    .command('check <file>', 'check a qcow2 image for leaks and corruptions; -r repairs', checkOptions, runCheck)
    .example('$0 create disk.img 10G', 'a sparse 10 GiB raw image')
    .example('$0 create -f qcow2 -b base.img -F raw overlay.qcow2', 'a qcow2 overlay on a raw base')
    .example('touch disk.view && $0 mount disk.img disk.view', 'serve it on disk.view (Ctrl-C unmounts)')
    .example('fallocate -p -o 1M -l 4M disk.view', 'discard: the range reads as zero and frees space')
    .example('$0 create -f qcow2 -b https://example.org/distro.iso -F raw cache.qcow2', 'a local overlay on a remote ISO')
    .example('$0 mount --copy-on-read cache.qcow2 distro.iso', 'each block read crosses the network once')
    .example('$0 stream -p --drop-backing cache.qcow2', 'fetch the rest, then stand alone')
    .example('$0 jobs distro.iso && $0 job pause stream-1', "a mount's jobs; pause one")
    .demandCommand(1, 'name a command')
    .strict()
    .help()
    .alias('h', 'help')
    .version()
    .wrap(Math.min(110, process.stdout.columns || 100))
    .fail((msg, err) => {
      // yargs rethrows what an option's coerce threw (numbers.ts) as its own YError, code lost: a usage error.
      if (err?.name === 'YError') throw new VdiskError('ERR_USAGE', `${err.message} (see vdisk --help)`);
      throw err ?? new VdiskError('ERR_USAGE', `${msg} (see vdisk --help)`);
    })
    .parseAsync();
}

// A reader that stops early (`vdisk map img | head`) closes the pipe: what is
// left of the output has nobody to read it, which is no error of ours. Without a
// listener Node throws EPIPE from the write and the process dies with a stack;
// a mount must never die that way, so the output is dropped and work goes on.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE' || err.code === 'ERR_STREAM_DESTROYED') return;
    throw err;
  });
}

main(hideBin(process.argv)).catch((err: unknown) => {
  reportError(err);
  process.exitCode = exitCodeOf(err);
});
