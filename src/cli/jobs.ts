/**
 * `vdisk jobs TARGET`: the jobs of the mount serving an image or mountpoint.
 * `vdisk job ACTION ID [--mount TARGET]`: pause, resume, cancel or complete one.
 * Without --mount every mount of the user is asked (through its control
 * socket) which of them has the job; ids are unique only within a mount, so
 * when two mounts have one of that id, --mount says which.
 */
import type net from 'node:net';
import type { Argv } from 'yargs';
import { JOB_ACTIONS, type JobAction, type JobInfo } from '../jobs/job.js';
import { VdiskError } from '../errors.js';
import { displayName } from '../drivers/http/url.js';
import { connectSocket } from '../export/control.js';
import { ask, connectAll, connectTarget } from './control-client.js';
import { printJobState, printJobs, type OutputFormat } from './job-output.js';

export interface JobsArgs {
  target: string;
  output: OutputFormat;
}

export function jobsOptions(y: Argv): Argv<JobsArgs> {
  return y
    .positional('target', { type: 'string', demandOption: true, describe: 'a mounted image, or its mountpoint' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const, describe: 'json: one array of {id, type, target, state, status, progress, rateLimit, error}' })
    .epilogue('Jobs run by a command in its own process (vdisk stream on an image not mounted) are shown by that command, not here.') as unknown as Argv<JobsArgs>;
}

async function mountOf(target: string): Promise<net.Socket> {
  const sock = await connectTarget(target);
  if (!sock) throw new VdiskError('ERR_NOT_MOUNTED', `no vdisk mount serves ${displayName(target)} (or it runs read-only or on a raw image, without a control socket)`);
  return sock;
}

export async function runJobs(args: JobsArgs): Promise<void> {
  const reply = await ask(await mountOf(args.target), { op: 'jobs' });
  printJobs(reply.jobs ?? [], args.output);
}

export interface JobArgs {
  action: JobAction;
  id: string;
  mount?: string;
  output: OutputFormat;
}

export function jobOptions(y: Argv): Argv<JobArgs> {
  return y
    .positional('action', { choices: JOB_ACTIONS, demandOption: true, describe: 'pause and resume at a step boundary; cancel stops (a stream resumes when run again); complete finishes a ready job' })
    .positional('id', { type: 'string', demandOption: true, describe: 'the job id, as vdisk jobs shows it (e.g. stream-1)' })
    .option('mount', { type: 'string', describe: 'the mounted image or mountpoint running the job (default: whichever of your mounts has that id)' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const }) as unknown as Argv<JobArgs>;
}

/** The one mount of the user that has job `id`. */
async function findJob(id: string): Promise<net.Socket> {
  const holders = new Map<number, string>();
  for (const { path, sock } of await connectAll()) {
    // A mount listens under two names: count each process once.
    const reply = await ask(sock, { op: 'jobs' }).catch(() => null);
    if (reply?.jobs?.some((j: JobInfo) => j.id === id)) holders.set(reply.pid ?? holders.size, path);
  }
  if (holders.size === 0) throw new VdiskError('ERR_JOB_NOT_FOUND', `no mount of yours has a job ${id} (vdisk jobs TARGET lists a mount's jobs)`);
  if (holders.size > 1) throw new VdiskError('ERR_USAGE', `${holders.size} mounts have a job ${id}: say which with --mount`);
  const sock = await connectSocket([...holders.values()][0]!);
  if (!sock) throw new VdiskError('ERR_JOB_NOT_FOUND', `the mount that had job ${id} has stopped`);
  return sock;
}

export async function runJob(args: JobArgs): Promise<void> {
  const sock = args.mount !== undefined ? await mountOf(args.mount) : await findJob(args.id);
  const reply = await ask(sock, { op: 'job', action: args.action, id: args.id });
  if (!reply.job) throw new VdiskError('EIO', 'the mount answered without the job');
  printJobState(args.action, reply.job, args.output);
}
