/**
 * Long-running operations on images (stream today; mirror, commit, backup
 * next), after QEMU's job model (job.c, qapi JobStatus):
 *
 *   created -> running <-> paused
 *                 |  \-> ready (waits for complete or cancel; mirror pivots then)
 *                 v
 *            [aborting] -> concluded (status completed | cancelled | failed, with the error)
 *
 * The job's body does its work in chunks and calls pausePoint() between them:
 * that is where a pause takes effect, a cancel is seen, and the rate limit
 * waits. So "paused" means the body is parked at a chunk boundary, with no
 * request in flight and progress frozen; a pause asked for while a chunk runs
 * shows as running until the chunk ends (QEMU's standby, folded into running).
 *
 * A cancel is not a failure: the body sees it at its next pause point, leaves
 * the image consistent (stream flushes, and resumes later from where it
 * stopped) and returns; the job concludes with status cancelled.
 */
import { VdiskError, codeOf } from '../errors.js';
import { tracer } from '../trace.js';
import { Emitter } from './emitter.js';
import { RateLimiter } from './rate-limit.js';

const trace = tracer('jobs');

export type JobState = 'created' | 'running' | 'paused' | 'ready' | 'aborting' | 'concluded';
export type JobStatus = 'completed' | 'cancelled' | 'failed';
export type JobAction = 'pause' | 'resume' | 'cancel' | 'complete';
export const JOB_ACTIONS: readonly JobAction[] = ['pause', 'resume', 'cancel', 'complete'];

export interface JobProgress {
  /** Work done, in the job's unit (bytes for every job so far). */
  current: number;
  /** Work known so far: it may grow while the job runs (a mirror's guest writes add work). */
  total: number;
  /** Bytes the job wrote (copy jobs): less than current where the work needed no copy. */
  copied?: number;
}

/** What `vdisk jobs` shows of a job; plain data, sent as it is over the control socket. */
export interface JobInfo {
  id: string;
  type: string;
  /** The node the job works on, by its display name. */
  target: string;
  state: JobState;
  /** Set once concluded. */
  status?: JobStatus;
  error?: { code: string; message: string };
  progress: JobProgress;
  /** Bytes/s, 0 for none. */
  rateLimit: number;
}

// A type, not an interface: the emitter needs its index signature.
export type JobEvents<R> = {
  state: JobInfo;
  progress: JobInfo;
  /** Once, with the body's result (undefined when it failed). */
  concluded: { info: JobInfo; result: R | undefined };
};

export interface JobOptions {
  /** Bytes/s; 0 or absent: as fast as it goes. */
  rateLimit?: number;
}

export type JobBody<R> = (job: Job<R>) => Promise<R>;

export class Job<R = unknown> {
  readonly events = new Emitter<JobEvents<R>>();
  /** Resolves when the job has concluded, whatever its status; never rejects. */
  readonly concluded: Promise<void>;
  private stateValue: JobState = 'created';
  private status: JobStatus | undefined;
  private error: { code: string; message: string } | undefined;
  private failureValue: unknown;
  private resultValue: R | undefined;
  private readonly progressValue: JobProgress = { current: 0, total: 0 };
  private readonly limiter: RateLimiter;
  private pauseRequested = false;
  private cancelRequested = false;
  private completeRequested = false;
  /** The body waits in waitReady(): a resume takes it back to ready, not running. */
  private inReady = false;
  /** Wakes the body from a rate-limit sleep, a pause or the ready state, to look at its requests again. */
  private wake: (() => void) | null = null;
  private markConcluded!: () => void;

  constructor(
    readonly id: string,
    readonly type: string,
    readonly target: string,
    private readonly body: JobBody<R>,
    options: JobOptions = {},
  ) {
    this.limiter = new RateLimiter(options.rateLimit ?? 0);
    this.concluded = new Promise((resolve) => (this.markConcluded = resolve));
  }

  get state(): JobState {
    return this.stateValue;
  }

  get result(): R | undefined {
    return this.resultValue;
  }

  /** What the body threw, when the job failed: an in-process caller rethrows it as it is. */
  get failure(): unknown {
    return this.failureValue;
  }

  /** True once cancel() was called: the body should wind down at its next step. */
  get cancelled(): boolean {
    return this.cancelRequested;
  }

  info(): JobInfo {
    return {
      id: this.id,
      type: this.type,
      target: this.target,
      state: this.stateValue,
      ...(this.status ? { status: this.status } : {}),
      ...(this.error ? { error: { ...this.error } } : {}),
      progress: { ...this.progressValue },
      rateLimit: this.limiter.bytesPerSecond,
    };
  }

  /** Run the body; the job concludes when it returns or throws. */
  start(): void {
    if (this.stateValue !== 'created') throw new VdiskError('ERR_JOB_STATE', `job ${this.id} has started already`);
    this.setState('running');
    void this.run();
  }

  private async run(): Promise<void> {
    try {
      this.resultValue = await this.body(this);
      this.status = this.cancelRequested ? 'cancelled' : 'completed';
    } catch (err) {
      this.status = 'failed';
      this.failureValue = err;
      this.error = { code: codeOf(err), message: (err as Error).message };
    }
    trace('job %s concluded status=%s%s', this.id, this.status, this.error ? ` error=${this.error.code}` : '');
    this.setState('concluded');
    this.events.emit('concluded', { info: this.info(), result: this.resultValue });
    this.markConcluded();
  }

  // -------------------------------------------------------------------------
  // What the user asks (vdisk job ACTION ID)

  pause(): void {
    this.expectLive('pause');
    if (this.stateValue === 'aborting') throw new VdiskError('ERR_JOB_STATE', `job ${this.id} is being cancelled`);
    this.pauseRequested = true;
    trace('job %s pause requested', this.id);
  }

  resume(): void {
    this.expectLive('resume');
    if (!this.pauseRequested) throw new VdiskError('ERR_JOB_STATE', `job ${this.id} is not paused`);
    this.pauseRequested = false;
    trace('job %s resumed', this.id);
    // Shown at once (the body wakes on the next tick), so whoever resumed sees the job running again.
    if (this.stateValue === 'paused') this.setState(this.inReady ? 'ready' : 'running');
    this.wakeBody();
  }

  /** Idempotent: cancelling a job that is already winding down is no error. */
  cancel(): void {
    this.expectLive('cancel');
    if (this.cancelRequested) return;
    this.cancelRequested = true;
    this.pauseRequested = false;
    trace('job %s cancel requested', this.id);
    this.setState('aborting');
    this.wakeBody();
  }

  /** Only a job that is ready (it has caught up and waits for the word) can complete. */
  complete(): void {
    this.expectLive('complete');
    if (this.stateValue !== 'ready') throw new VdiskError('ERR_JOB_STATE', `job ${this.id} (${this.type}) is ${this.stateValue}, not ready: only a ready job can be completed`);
    this.completeRequested = true;
    this.wakeBody();
  }

  act(action: JobAction): void {
    this[action]();
  }

  setRateLimit(bytesPerSecond: number): void {
    this.limiter.setRate(bytesPerSecond);
    this.wakeBody();
  }

  private expectLive(action: string): void {
    if (this.stateValue === 'concluded') throw new VdiskError('ERR_JOB_STATE', `job ${this.id} has concluded (${this.status}): nothing to ${action}`);
  }

  // -------------------------------------------------------------------------
  // What the body calls

  /** The chunk size the body should use: small enough under a rate limit for the limit to be smooth. */
  chunkBytes(min: number, max: number): number {
    return this.limiter.chunkBytes(min, max);
  }

  setProgress(current: number, total = this.progressValue.total, copied?: number): void {
    this.progressValue.current = current;
    this.progressValue.total = Math.max(total, current);
    if (copied !== undefined) this.progressValue.copied = copied;
    this.events.emit('progress', this.info());
  }

  /**
   * Between chunks: `bytes` is the work the last chunk moved (for the rate
   * limit). Waits out the rate limit and any pause; returns false when the
   * job is cancelled and the body should stop.
   */
  async pausePoint(bytes = 0): Promise<boolean> {
    let delay = this.limiter.take(bytes);
    const until = performance.now() + delay;
    while (!this.cancelRequested) {
      if (this.pauseRequested) {
        this.setState('paused');
        await this.sleep(Infinity);
        continue;
      }
      if (this.stateValue === 'paused') this.setState('running');
      delay = until - performance.now();
      if (delay <= 0) break;
      await this.sleep(delay);
    }
    if (this.stateValue === 'paused') this.setState('running');
    return !this.cancelRequested;
  }

  /**
   * The job has caught up (a mirror's target matches its source): say so and
   * wait for complete (true) or cancel (false). Pauses are honoured here too.
   */
  async waitReady(): Promise<boolean> {
    this.inReady = true;
    while (!this.cancelRequested && !this.completeRequested) {
      this.setState(this.pauseRequested ? 'paused' : 'ready');
      await this.sleep(Infinity);
    }
    this.inReady = false;
    if (!this.cancelRequested) this.setState('running');
    return !this.cancelRequested;
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = Number.isFinite(ms) ? setTimeout(() => done(), ms) : null;
      const done = () => {
        if (timer) clearTimeout(timer);
        if (this.wake === done) this.wake = null;
        resolve();
      };
      this.wake = done;
    });
  }

  private wakeBody(): void {
    this.wake?.();
  }

  private setState(state: JobState): void {
    if (this.stateValue === state) return;
    // Once aborting, the job stays so until it concludes: a pause point passing by must not show it running.
    if (this.stateValue === 'aborting' && state !== 'concluded') return;
    trace('job %s %s -> %s', this.id, this.stateValue, state);
    this.stateValue = state;
    this.events.emit('state', this.info());
  }
}
