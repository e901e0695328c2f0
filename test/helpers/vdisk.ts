/** Run the real `vdisk` CLI as a child process and wait on what it prints. */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../dist/cli/main.js', import.meta.url));

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function vdisk(args: string[], options: { input?: string } = {}): RunResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', input: options.input ?? '', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export function sh(command: string): RunResult {
  const r = spawnSync('bash', ['-c', command], { encoding: 'utf8', timeout: 300_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Like vdisk(), without blocking this process's event loop (needed when a server lives in it). */
export function vdiskAsync(args: string[]): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args]);
}

/** Like sh(), without blocking this process's event loop. */
export function shAsync(command: string): Promise<RunResult> {
  return run('bash', ['-c', command]);
}

function run(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

export function tmpdir(prefix = 'vdisk-test-'): string {
  // /var/tmp: a disk filesystem with holes, fallocate and SEEK_DATA (tmpfs lacks ZERO_RANGE).
  return fs.mkdtempSync(path.join('/var/tmp', prefix));
}

export function isMounted(mountpoint: string): boolean {
  const real = path.join(fs.realpathSync(path.dirname(path.resolve(mountpoint))), path.basename(mountpoint));
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === real);
}

export class Mount {
  readonly proc: ChildProcess;
  readonly mountpoint: string;
  stderr = '';
  readonly exited: Promise<number | null>;

  private constructor(proc: ChildProcess, mountpoint: string) {
    this.proc = proc;
    this.mountpoint = mountpoint;
    this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
    proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
  }

  /** `vdisk mount image mountpoint ...args`; resolves once it says it is serving. */
  static async start(image: string, mountpoint: string, args: string[] = []): Promise<Mount> {
    if (!fs.existsSync(mountpoint)) fs.writeFileSync(mountpoint, '');
    const proc = spawn(process.execPath, [CLI, 'mount', image, mountpoint, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const m = new Mount(proc, mountpoint);
    await new Promise<void>((resolve, reject) => {
      const onData = () => {
        if (m.stderr.includes('vdisk: serving')) {
          proc.stderr!.off('data', onData);
          resolve();
        }
      };
      proc.stderr!.on('data', onData);
      proc.on('exit', (code) => reject(new Error(`vdisk mount exited with ${code} before serving:\n${m.stderr}`)));
    });
    return m;
  }

  /** Ctrl-C, and wait for a clean exit. */
  async stop(): Promise<number | null> {
    if (this.proc.exitCode === null) this.proc.kill('SIGINT');
    return this.exited;
  }
}

export function randomFile(file: string, bytes: number): Buffer {
  const data = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 65536) {
    const n = Math.min(65536, bytes - i);
    crypto.getRandomValues(data.subarray(i, i + n));
  }
  fs.writeFileSync(file, data);
  return data;
}

export const MiB = 1024 * 1024;
export { os };
