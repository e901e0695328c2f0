/**
 * What every job command shows of a job, from one place: the progress bar
 * (-p), progress as JSON event lines (-p with --output json), and the job list
 * of `vdisk jobs`. Progress and events go to stderr, so stdout keeps only the
 * command's answer (one JSON line with --output json).
 */
import type { JobInfo, JobProgress } from '../jobs/job.js';
import { formatSize } from './util.js';

export type OutputFormat = 'human' | 'json';

/** At most this often a new progress line (without a terminal, each one is a line of output). */
const PROGRESS_INTERVAL_MS = 200;

export class JobProgressView {
  private readonly started = Date.now();
  private last = 0;
  private shown = false;

  /** The job's id, for event lines, once known. */
  id = '';

  /** `enabled`: -p was given; `format`: a bar for people, event lines for programs. */
  constructor(
    private readonly enabled: boolean,
    private readonly format: OutputFormat,
  ) {}

  update(p: JobProgress): void {
    if (!this.enabled) return;
    const finished = p.current >= p.total;
    if (Date.now() - this.last < PROGRESS_INTERVAL_MS && !finished) return;
    this.last = Date.now();
    this.shown = true;
    if (this.format === 'json') {
      process.stderr.write(`${JSON.stringify({ event: 'progress', ...(this.id ? { id: this.id } : {}), ...p })}\n`);
      return;
    }
    const pct = percentOf(p.current, p.total);
    const secs = Math.max(0.001, (Date.now() - this.started) / 1000);
    const width = 30;
    const filled = Math.round((pct / 100) * width);
    const copied = p.copied ?? p.current;
    const line = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct.toFixed(1).padStart(5)}%  ${formatSize(p.current)} of ${formatSize(p.total)}  copied ${formatSize(copied)}  ${formatSize(copied / secs)}/s`;
    process.stderr.write(process.stderr.isTTY ? `\r${line}` : `${line}\n`);
  }

  end(): void {
    if (this.enabled && this.shown && this.format === 'human' && process.stderr.isTTY) process.stderr.write('\n');
  }
}

/** How far `current` is through `total`, in percent; an empty job (total 0) is done. */
export function percentOf(current: number, total: number): number {
  return total ? (100 * current) / total : 100;
}

function percent(p: JobProgress): string {
  return `${percentOf(p.current, p.total).toFixed(1)}%`;
}

/** `vdisk jobs`: one JSON array, or a table. */
export function printJobs(jobs: JobInfo[], format: OutputFormat): void {
  if (format === 'json') {
    process.stdout.write(`${JSON.stringify(jobs)}\n`);
    return;
  }
  if (!jobs.length) {
    process.stdout.write('no jobs\n');
    return;
  }
  const rows = [
    ['ID', 'TYPE', 'STATE', 'PROGRESS', 'RATE', 'ERROR'],
    ...jobs.map((j) => [
      j.id,
      j.type,
      j.status ? `${j.state} (${j.status})` : j.state,
      `${percent(j.progress)} ${formatSize(j.progress.current)}/${formatSize(j.progress.total)}`,
      j.rateLimit ? `${formatSize(j.rateLimit)}/s` : '-',
      j.error ? `${j.error.code}: ${j.error.message}` : '',
    ]),
  ];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  for (const r of rows) process.stdout.write(`${r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ').trimEnd()}\n`);
}

/** `vdisk job ACTION ID`: what the job is now. */
export function printJobState(action: string, job: JobInfo, format: OutputFormat): void {
  if (format === 'json') process.stdout.write(`${JSON.stringify(job)}\n`);
  else process.stdout.write(`${action} ${job.id}: ${job.state}${job.status ? ` (${job.status})` : ''}, ${percent(job.progress)}\n`);
}
