/**
 * The job state machine on its own, with job bodies that count steps: the
 * states a user sees, the ready/complete hand-shake no stream reaches, how a
 * cancel and a failure conclude, the runner's ids, and the token bucket's
 * arithmetic (its clock is a parameter, so the test counts, never times).
 */
import { describe, expect, it } from 'vitest';
import { Job, type JobInfo, type JobState } from '../../src/jobs/job.js';
import { JobRunner } from '../../src/jobs/runner.js';
import { RateLimiter } from '../../src/jobs/rate-limit.js';
import { VdiskError } from '../../src/errors.js';

/** Resolves when `job` enters `state` (now, if it is in it). */
function reach(job: Job<unknown>, state: JobState): Promise<JobInfo> {
  if (job.state === state) return Promise.resolve(job.info());
  return new Promise((resolve) => {
    const off = job.events.on('state', (info) => {
      if (info.state === state) {
        off();
        resolve(info);
      }
    });
  });
}

/** A body that does `steps` steps of 1 unit, pause point before each; `stepped` counts them. */
function counting(steps: number) {
  const counter = { stepped: 0 };
  const body = async (job: Job<number>) => {
    job.setProgress(0, steps);
    for (let i = 0; i < steps; i++) {
      if (!(await job.pausePoint())) return counter.stepped;
      counter.stepped++;
      job.setProgress(counter.stepped);
      await new Promise((r) => setImmediate(r));
    }
    return counter.stepped;
  };
  return { counter, body };
}

describe('Job', () => {
  it('pauses at a step boundary: no step runs while paused; resume carries on to completed', async () => {
    const { counter, body } = counting(1000);
    const job = new Job('t-1', 't', 'node', body);
    const states: JobState[] = [];
    job.events.on('state', (i) => states.push(i.state));
    job.start();
    job.pause();
    const paused = await reach(job, 'paused');
    const at = counter.stepped;
    expect(paused.progress.current).toBe(at);
    // Many turns of the event loop later, still no step.
    for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
    expect(counter.stepped).toBe(at);
    job.resume();
    expect(job.state).toBe('running');
    await job.concluded;
    expect(job.info()).toMatchObject({ state: 'concluded', status: 'completed', progress: { current: 1000, total: 1000 } });
    expect(job.result).toBe(1000);
    expect(states).toEqual(['running', 'paused', 'running', 'concluded']);
  });

  it('a cancel of a paused job concludes it cancelled, through aborting, without another step', async () => {
    const { counter, body } = counting(1000);
    const job = new Job('t-1', 't', 'node', body);
    job.start();
    job.pause();
    await reach(job, 'paused');
    const at = counter.stepped;
    job.cancel();
    expect(job.state).toBe('aborting');
    await job.concluded;
    expect(counter.stepped).toBe(at);
    expect(job.info()).toMatchObject({ state: 'concluded', status: 'cancelled' });
    expect(() => job.resume()).toThrow(/ERR_JOB_STATE|has concluded/);
  });

  it('a job that fails concludes failed with the error code and message', async () => {
    const job = new Job('t-1', 't', 'node', async () => {
      throw new VdiskError('ERR_IMAGE_CORRUPT', 'bad L2 entry');
    });
    job.start();
    await job.concluded;
    expect(job.info()).toMatchObject({ state: 'concluded', status: 'failed', error: { code: 'ERR_IMAGE_CORRUPT', message: 'bad L2 entry' } });
    expect(job.failure).toBeInstanceOf(VdiskError);
  });

  it('complete is refused until the job is ready, then ends the wait; cancel in ready ends it too', async () => {
    const body = async (job: Job<boolean>) => job.waitReady();
    const a = new Job('m-1', 'mirror', 'node', body);
    expect(() => a.complete()).toThrow(/is created, not ready/);
    a.start();
    await reach(a, 'ready');
    a.pause();
    a.resume();
    expect(a.state).toBe('ready');
    a.complete();
    await a.concluded;
    expect(a.info()).toMatchObject({ status: 'completed' });
    expect(a.result).toBe(true);

    const b = new Job('m-2', 'mirror', 'node', body);
    b.start();
    await reach(b, 'ready');
    b.cancel();
    await b.concluded;
    expect(b.info()).toMatchObject({ status: 'cancelled' });
    expect(b.result).toBe(false);
  });

  it('progress may grow its total while the job runs', async () => {
    const job = new Job('t-1', 't', 'node', async (j) => {
      j.setProgress(5, 10);
      j.setProgress(8, 20);
      return 0;
    });
    const seen: number[] = [];
    job.events.on('progress', (i) => seen.push(i.progress.total));
    job.start();
    await job.concluded;
    expect(seen).toEqual([10, 20]);
  });
});

describe('JobRunner', () => {
  it('holds several jobs at once, ids by type, and cancels them all', async () => {
    const runner = new JobRunner();
    const x = runner.start('stream', 'a', counting(1e9).body);
    const y = runner.start('stream', 'b', counting(1e9).body);
    const z = runner.start('mirror', 'a', async (j: Job<boolean>) => j.waitReady());
    expect([x.id, y.id, z.id]).toEqual(['stream-1', 'stream-2', 'mirror-1']);
    expect(runner.live()).toHaveLength(3);
    expect(() => runner.get('stream-3')).toThrow(expect.objectContaining({ code: 'ERR_JOB_NOT_FOUND' }));
    await runner.cancelAll();
    expect(runner.list().map((j) => [j.id, j.state, j.status])).toEqual([
      ['stream-1', 'concluded', 'cancelled'],
      ['stream-2', 'concluded', 'cancelled'],
      ['mirror-1', 'concluded', 'cancelled'],
    ]);
  });
});

describe('RateLimiter', () => {
  it('lets a burst of a tenth of a second through, then asks for the time the rate needs', () => {
    let now = 0;
    const rl = new RateLimiter(1000, () => now); // 1000 B/s: a 100 B bucket
    expect(rl.take(100)).toBe(0);
    expect(rl.take(500)).toBe(500); // 500 B over: half a second
    now = 500;
    expect(rl.take(0)).toBe(0);
    now = 10_000; // idle a long time: the bucket refills only to its 100 B
    expect(rl.take(300)).toBe(200);
  });

  it('no limit never waits; chunks shrink to about a quarter second of work under a limit', () => {
    expect(new RateLimiter(0).take(1e12)).toBe(0);
    expect(new RateLimiter(0).chunkBytes(65536, 8 << 20)).toBe(8 << 20);
    expect(new RateLimiter(4 << 20).chunkBytes(65536, 8 << 20)).toBe(1 << 20);
    expect(new RateLimiter(1).chunkBytes(65536, 8 << 20)).toBe(65536);
  });
});
