/** `vdisk stream`: pull everything an image still takes from its backing chain into it. */
import fs from 'node:fs/promises';
import type { Argv } from 'yargs';
import { openImage } from '../block/open.js';
import { connectControl } from '../export/control.js';
import { streamImage, type StreamProgress, type StreamResult } from '../jobs/stream.js';
import { VdiskError } from '../errors.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';
import { displayName } from '../drivers/http/url.js';
import { formatSize } from './util.js';

export interface StreamArgs {
  image: string;
  'drop-backing': boolean;
  progress: boolean;
  output: 'human' | 'json';
  'backing-format'?: string;
}

export function streamOptions(y: Argv): Argv<StreamArgs & HttpArgs & ConfineArgs> {
  return withConfineOptions(withHttpOptions(y))
    .positional('image', { type: 'string', demandOption: true, describe: 'a qcow2 image with a backing file (mounted or not)' })
    .option('drop-backing', { type: 'boolean', default: false, describe: 'when complete, remove the backing link so the image stands alone' })
    .option('progress', { alias: 'p', type: 'boolean', default: false, describe: 'show a progress bar and the rate' })
    .option('backing-format', { alias: 'F', type: 'string', choices: ['raw', 'qcow2'], describe: 'format of a backing file the image does not name' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const })
    .epilogue('Ctrl-C stops the job; running it again resumes where it stopped. On a mounted image the mount process runs the job.') as unknown as Argv<StreamArgs & HttpArgs & ConfineArgs>;
}

/** At most this often a new progress line (without a terminal, each one is a line of output). */
const PROGRESS_INTERVAL_MS = 200;

class ProgressBar {
  private readonly started = Date.now();
  private readonly enabled: boolean;
  private last = 0;
  constructor(enabled: boolean) {
    this.enabled = enabled;
  }
  update(p: StreamProgress): void {
    if (!this.enabled) return;
    if (Date.now() - this.last < PROGRESS_INTERVAL_MS && p.done < p.total) return;
    this.last = Date.now();
    const pct = p.total ? (100 * p.done) / p.total : 100;
    const secs = Math.max(0.001, (Date.now() - this.started) / 1000);
    const width = 30;
    const filled = Math.round((pct / 100) * width);
    const line = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct.toFixed(1).padStart(5)}%  ${formatSize(p.done)} of ${formatSize(p.total)}  copied ${formatSize(p.copied)}  ${formatSize(p.copied / secs)}/s`;
    process.stderr.write(process.stderr.isTTY ? `\r${line}` : `${line}\n`);
  }
  end(): void {
    if (this.enabled && process.stderr.isTTY) process.stderr.write('\n');
  }
}

function report(args: StreamArgs, r: StreamResult): void {
  if (args.output === 'json') {
    process.stdout.write(`${JSON.stringify(r)}\n`);
  } else if (r.interrupted) {
    process.stderr.write(`vdisk: stream interrupted at ${((100 * r.done) / r.total).toFixed(1)}%: run it again to resume\n`);
  } else {
    process.stdout.write(`streamed ${args.image}: copied ${formatSize(r.copied)} of ${formatSize(r.total)}${r.droppedBacking ? '; backing file dropped' : ''}\n`);
  }
  if (r.interrupted) process.exitCode = 130;
}

/** Ask the mount process that holds the image to run the job; null if nobody serves it. */
async function viaMount(args: StreamArgs, imageRealPath: string, bar: ProgressBar): Promise<StreamResult | null> {
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
    sock.write(`${JSON.stringify({ op: 'stream', dropBacking: args['drop-backing'] })}\n`);
    let buf = '';
    let result: StreamResult | null = null;
    let error: { code: string; message: string } | null = null;
    let last: StreamProgress = { done: 0, total: 0, copied: 0 };
    try {
      for await (const chunk of sock) {
        buf += (chunk as Buffer).toString();
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          const msg = JSON.parse(buf.slice(0, nl)) as { type: string } & StreamResult & { code: string; message: string };
          buf = buf.slice(nl + 1);
          if (msg.type === 'progress') bar.update((last = msg));
          else if (msg.type === 'done') result = msg;
          else if (msg.type === 'error') error = msg;
        }
      }
    } catch (err) {
      if (!interrupted) throw err;
    }
    // Any code the mount reports (it may be a system one, not in our table) is passed on as it is.
    if (error) throw Object.assign(new Error(error.message), { code: error.code });
    // The connection closed without an answer: we were interrupted.
    return result ?? { ...last, droppedBacking: false, interrupted: true };
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

export async function runStream(args: StreamArgs & HttpArgs & ConfineArgs): Promise<void> {
  const confine = confineFromArgs(args);
  let real: string;
  try {
    real = await fs.realpath(args.image);
  } catch {
    throw new VdiskError('ERR_IMAGE_NOT_FOUND', `image not found: ${displayName(args.image)}`);
  }
  const bar = new ProgressBar(args.progress);
  const remote = await viaMount(args, real, bar);
  if (remote) {
    bar.end();
    return report(args, remote);
  }
  const top = await openImage(args.image, { ...imageOpenOptions(args), ...confine, format: 'qcow2', copyOnRead: false });
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const r = await streamImage(top, { dropBacking: args['drop-backing'], signal: abort.signal, onProgress: (p) => bar.update(p) });
    bar.end();
    report(args, r);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await top.close();
  }
}
