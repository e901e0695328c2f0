/**
 * The jobs of one process: a mount's (several at once, started through its
 * control socket) or an offline command's (its one job). Ids are the type and
 * a number ("stream-1"), unique within the process. A concluded job stays
 * listed (with its status and error) until KEEP_CONCLUDED newer ones have
 * concluded, so whoever asks after the end still learns how it ended.
 */
import { VdiskError } from '../errors.js';
import { Job, type JobBody, type JobInfo, type JobOptions } from './job.js';

const KEEP_CONCLUDED = 16;

export class JobRunner {
  private readonly jobs = new Map<string, Job<unknown>>();
  private readonly seq = new Map<string, number>();

  /** Create and start a job. */
  start<R>(type: string, target: string, body: JobBody<R>, options: JobOptions = {}): Job<R> {
    const n = (this.seq.get(type) ?? 0) + 1;
    this.seq.set(type, n);
    const job = new Job<R>(`${type}-${n}`, type, target, body, options);
    this.jobs.set(job.id, job as Job<unknown>);
    void job.concluded.then(() => this.forgetOld());
    job.start();
    return job;
  }

  get(id: string): Job<unknown> {
    const job = this.jobs.get(id);
    if (!job) throw new VdiskError('ERR_JOB_NOT_FOUND', `no job ${id}${this.jobs.size ? ` (jobs: ${[...this.jobs.keys()].join(', ')})` : ''}`);
    return job;
  }

  has(id: string): boolean {
    return this.jobs.has(id);
  }

  /** Oldest first. */
  list(): JobInfo[] {
    return [...this.jobs.values()].map((j) => j.info());
  }

  /** Jobs not yet concluded. */
  live(): Job<unknown>[] {
    return [...this.jobs.values()].filter((j) => j.state !== 'concluded');
  }

  /** Cancel every job and wait for all to conclude (a mount that stops must not wait for a whole stream). */
  async cancelAll(): Promise<void> {
    const live = this.live();
    for (const j of live) j.cancel();
    await Promise.all(live.map((j) => j.concluded));
  }

  private forgetOld(): void {
    const concluded = [...this.jobs.values()].filter((j) => j.state === 'concluded');
    for (const j of concluded.slice(0, Math.max(0, concluded.length - KEEP_CONCLUDED))) this.jobs.delete(j.id);
  }
}
