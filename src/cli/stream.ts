/** `vdisk stream`: pull everything an image still takes from its backing chain into it, as a job. */
import fs from 'node:fs/promises';
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { openImage } from '../drivers/chain.js';
import { connectControl } from '../export/control.js';
import { JobRunner } from '../jobs/runner.js';
import { startStream, type StreamProgress, type StreamResult } from '../jobs/stream.js';
import { VdiskError } from '../errors.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';
import { displayName } from '../drivers/http/url.js';
import { JobProgressView, percentOf } from './job-output.js';
import { controlMessages, mountError } from './control-client.js';
import { OPTION_NUMBERS, coerceWith } from './numbers.js';
import { formatSize } from './util.js';

export interface StreamArgs {
  image: string;
  'drop-backing': boolean;
  progress: boolean;
  output: 'human' | 'json';
  'backing-format'?: string;
  'rate-limit'?: number;
}

export function streamOptions(y: Argv): Argv<StreamArgs & HttpArgs & ConfineArgs> {
  return withConfineOptions(withHttpOptions(y))
    .positional('image', { type: 'string', demandOption: true, describe: 'a qcow2 image with a backing file (mounted or not)' })
    .option('drop-backing', { type: 'boolean', default: false, describe: 'when complete, remove the backing link so the image stands alone' })
    .option('progress', { alias: 'p', type: 'boolean', default: false, describe: 'show a progress bar and the rate (with --output json: progress event lines on stderr)' })
    .option('rate-limit', { type: 'string', coerce: coerceWith('--rate-limit', OPTION_NUMBERS.rateLimit), describe: 'copy at most this many bytes per second (e.g. 20M); 0: no limit' })
    .option('backing-format', { alias: 'F', type: 'string', choices: FORMAT_NAMES, describe: 'format of a backing file the image does not name' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const })
    .epilogue(
      'Ctrl-C stops the job; running it again resumes where it stopped. On a mounted image the mount process runs the job: `vdisk jobs` lists it, `vdisk job pause|resume|cancel ID` acts on it.',
    ) as unknown as Argv<StreamArgs & HttpArgs & ConfineArgs>;
}

function report(args: StreamArgs, r: StreamResult): void {
  if (args.output === 'json') {
    process.stdout.write(`${JSON.stringify(r)}\n`);
  } else if (r.interrupted) {
    process.stderr.write(`vdisk: stream interrupted at ${percentOf(r.done, r.total).toFixed(1)}%: run it again to resume\n`);
  } else {
    process.stdout.write(`streamed ${args.image}: copied ${formatSize(r.copied)} of ${formatSize(r.total)}${r.droppedBacking ? '; backing file dropped' : ''}\n`);
  }
  if (r.interrupted) process.exitCode = 130;
}

function viewProgress(p: StreamProgress): { current: number; total: number; copied: number } {
  return { current: p.done, total: p.total, copied: p.copied };
}

/** Ask the mount process that holds the image to run the job; null if nobody serves it. */
async function viaMount(args: StreamArgs, imageRealPath: string, view: JobProgressView): Promise<StreamResult | null> {
  const sock = await connectControl(imageRealPath);
  if (!sock) return null;
  // Closing the connection is what stops the job in the mount process.
  let interrupted = false;
  const onSignal = () => {
    interrupted = true;
    sock.destroy();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    sock.write(`${JSON.stringify({ op: 'stream', dropBacking: args['drop-backing'], rateLimit: args['rate-limit'] ?? 0 })}\n`);
    let result: StreamResult | null = null;
    let error: { code: string; message: string } | null = null;
    let last: StreamProgress = { done: 0, total: 0, copied: 0 };
    try {
      for await (const msg of controlMessages<{ type: string } & StreamResult & { code: string; message: string }>(sock)) {
        if (msg.type === 'job') view.id = (msg as unknown as { id: string }).id;
        else if (msg.type === 'progress') view.update(viewProgress((last = msg)));
        else if (msg.type === 'done') result = msg;
        else if (msg.type === 'error') error = msg;
      }
    } catch (err) {
      if (!interrupted) throw err;
    }
    if (error) throw mountError(error);
    // The connection closed without an answer: we were interrupted.
    return result ? pick(result) : { ...pick(last), droppedBacking: false, interrupted: true };
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** The result's own fields: a message from the mount carries its `type` too. */
function pick<T extends StreamProgress>(r: T): StreamResult {
  const x = r as Partial<StreamResult>;
  return { done: r.done, total: r.total, copied: r.copied, droppedBacking: x.droppedBacking ?? false, interrupted: x.interrupted ?? true };
}

export async function runStream(args: StreamArgs & HttpArgs & ConfineArgs): Promise<void> {
  const confine = confineFromArgs(args);
  let real: string;
  try {
    real = await fs.realpath(args.image);
  } catch {
    throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${displayName(args.image)}`);
  }
  const view = new JobProgressView(args.progress, args.output);
  const remote = await viaMount(args, real, view);
  if (remote) {
    view.end();
    return report(args, remote);
  }
  // Not mounted: the same job, run by this process.
  const top = await openImage(args.image, { ...imageOpenOptions(args), ...confine, format: 'qcow2', copyOnRead: false });
  const runner = new JobRunner();
  let job: ReturnType<typeof startStream> | null = null;
  // A signal after the end (while closing) has nothing left to cancel.
  const onSignal = () => {
    if (job && job.state !== 'concluded') job.cancel();
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    job = startStream(runner, top, { dropBacking: args['drop-backing'], rateLimit: args['rate-limit'] ?? 0 });
    view.id = job.id;
    job.events.on('progress', (info) => view.update(info.progress));
    await job.concluded;
    view.end();
    if (!job.result) throw job.failure;
    report(args, job.result);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await top.close();
  }
}
