/**
 * A mount's control socket: other vdisk commands ask the process that has an
 * image open to run jobs on it (the image is locked against second writers),
 * list its jobs and pause, resume, cancel or complete them. Newline-delimited
 * JSON, one request per connection (below); the socket lives in a runtime
 * directory only the user can write (private-dir.ts), under two names: one
 * keyed by the image's real path, one by the mountpoint's (as mountinfo shows
 * it), so a command may name either. A client trusts only a server of its own
 * user or root (SO_PEERCRED).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { BlockNode } from '../block/node.js';
import { JobRunner } from '../jobs/runner.js';
import { JOB_ACTIONS, type JobAction } from '../jobs/job.js';
import { startStream, streamProgressOf } from '../jobs/stream.js';
import { VdiskError, codeOf } from '../errors.js';
import { native } from '../native.js';
import { ensurePrivateDir } from './private-dir.js';
import { tracer } from '../trace.js';

const trace = tracer('control');

/**
 * The directory of the user's control sockets: $XDG_RUNTIME_DIR/vdisk (a
 * per-user directory the session manager made), else /run/vdisk for root, else
 * /tmp/vdisk-UID. Whichever it is, ensurePrivateDir() checks it before use.
 */
export function controlDir(): string {
  const uid = process.getuid?.() ?? 0;
  const xdg = process.env['XDG_RUNTIME_DIR'];
  if (xdg) return path.join(xdg, 'vdisk');
  return uid === 0 ? '/run/vdisk' : `/tmp/vdisk-${uid}`;
}

export function controlSocketPath(imageRealPath: string, dir = controlDir()): string {
  const hash = crypto.createHash('sha256').update(imageRealPath).digest('hex').slice(0, 24);
  return path.join(dir, `${hash}.sock`);
}

/**
 * Connect to the mount serving an image (or a mountpoint: the key is either
 * real path), or null when none does. The answer of a server run by another
 * user is never trusted: she could have put her socket where ours should be,
 * and answer "done" to a stream never run.
 */
export async function connectControl(realPath: string): Promise<net.Socket | null> {
  const dir = controlDir();
  if (!(await ensurePrivateDir(dir, { create: false }))) return null;
  return connectSocket(controlSocketPath(realPath, dir));
}

/** Connect to one socket of the (already checked) control directory; null when nobody listens there. */
export async function connectSocket(socketPath: string): Promise<net.Socket | null> {
  const sock = await new Promise<net.Socket | null>((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => resolve(s));
    s.once('error', () => resolve(null));
  });
  if (!sock) return null;
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
  const cred = native().peerCredentials(fd);
  const uid = process.getuid?.() ?? 0;
  if (typeof cred === 'number' || (cred[1] !== uid && cred[1] !== 0)) {
    sock.destroy();
    const who = typeof cred === 'number' ? `an unknown peer (errno ${-cred})` : `uid ${cred[1]} (pid ${cred[0]})`;
    trace('refused peer %s on %s', who, socketPath);
    throw new VdiskError('ERR_CONTROL_PEER', `${socketPath} is served by ${who}, not by uid ${uid} or root: not trusting its answer`);
  }
  return sock;
}

/**
 * The requests. `stream` keeps its connection: progress lines, then `done`
 * (the result) or `error`; the client closing the connection cancels the job
 * (Ctrl-C on `vdisk stream`). The others get one answer and the end.
 *   {op:'stream', dropBacking?, rateLimit?} -> {type:'job',id} {type:'progress',...}* {type:'done',...} | {type:'error',...}
 *   {op:'jobs'}                             -> {type:'jobs', pid, jobs: JobInfo[]}   (pid: one mount has two socket names)
 *   {op:'job', action, id}                  -> {type:'ok', job: JobInfo} | {type:'error',...}
 */
export type ControlRequest =
  | { op: 'stream'; dropBacking?: boolean; rateLimit?: number }
  | { op: 'jobs' }
  | { op: 'job'; action: JobAction; id: string };

export class ControlServer {
  private readonly servers: net.Server[] = [];
  /** Where it listens: the image's key first, then the mountpoint's. */
  readonly paths: string[] = [];
  /** The mount's jobs; closing the mount cancels them rather than waiting for a whole stream. */
  readonly jobs = new JobRunner();
  private readonly sockets = new Set<net.Socket>();

  private constructor(private readonly top: BlockNode) {}

  get path(): string {
    return this.paths[0]!;
  }

  /** Listen under each of `realPaths` (the image's, the mountpoint's). */
  static async start(top: BlockNode, realPaths: string[]): Promise<ControlServer> {
    const dir = controlDir();
    await ensurePrivateDir(dir, { create: true });
    const ctl = new ControlServer(top);
    try {
      for (const key of new Set(realPaths)) await ctl.listen(controlSocketPath(key, dir));
    } catch (err) {
      await ctl.close();
      throw err;
    }
    return ctl;
  }

  private async listen(socketPath: string): Promise<void> {
    fs.rmSync(socketPath, { force: true }); // a stale one: we hold the image lock, so nobody else serves it
    const server = net.createServer();
    server.on('connection', (sock) => this.serve(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // The socket is born 0600 (a chmod after listen would follow a symlink put in
      // its place); bind() runs inside listen(), so the umask is ours only that long.
      const umask = process.umask(0o177);
      try {
        server.listen(socketPath, () => resolve());
      } finally {
        process.umask(umask);
      }
    });
    this.servers.push(server);
    this.paths.push(socketPath);
    trace('listening on %s', socketPath);
  }

  private serve(sock: net.Socket): void {
    let buf = '';
    const send = (msg: object) => sock.writable && sock.write(`${JSON.stringify(msg)}\n`);
    const fail = (err: unknown) => {
      send({ type: 'error', code: codeOf(err), message: (err as Error).message });
      sock.end();
    };
    sock.on('error', () => undefined);
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    const onData = (d: Buffer) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      sock.off('data', onData);
      let req: ControlRequest;
      try {
        req = JSON.parse(buf.slice(0, nl)) as ControlRequest;
      } catch {
        return fail(new VdiskError('ERR_USAGE', 'bad request'));
      }
      try {
        if (req.op === 'stream') return this.stream(req, sock, send);
        if (req.op === 'jobs') {
          send({ type: 'jobs', pid: process.pid, jobs: this.jobs.list() });
          return void sock.end();
        }
        if (req.op === 'job') {
          if (!JOB_ACTIONS.includes(req.action)) throw new VdiskError('ERR_USAGE', `unknown job action ${String(req.action)}`);
          const job = this.jobs.get(String(req.id));
          job.act(req.action);
          send({ type: 'ok', job: job.info() });
          return void sock.end();
        }
        throw new VdiskError('ERR_USAGE', `unknown op ${String((req as { op?: unknown }).op)}`);
      } catch (err) {
        fail(err);
      }
    };
    sock.on('data', onData);
  }

  /** A stream for a client that stays connected: it sees progress and the result, and its leaving cancels the job. */
  private stream(req: { dropBacking?: boolean; rateLimit?: number }, sock: net.Socket, send: (msg: object) => void): void {
    const rateLimit = Number(req.rateLimit ?? 0);
    if (!Number.isSafeInteger(rateLimit) || rateLimit < 0) throw new VdiskError('ERR_USAGE', `bad rate limit ${String(req.rateLimit)}`);
    trace('stream requested dropBacking=%s rateLimit=%d', Boolean(req.dropBacking), rateLimit);
    const job = startStream(this.jobs, this.top, { dropBacking: Boolean(req.dropBacking), rateLimit });
    send({ type: 'job', id: job.id });
    job.events.on('progress', (info) => send({ type: 'progress', ...streamProgressOf(info.progress) }));
    sock.on('close', () => {
      if (job.state !== 'concluded') job.cancel();
    });
    job.events.on('concluded', ({ info, result }) => {
      if (result) send({ type: 'done', ...result });
      else send({ type: 'error', code: info.error?.code ?? 'EIO', message: info.error?.message ?? 'the job failed' });
      sock.end();
    });
  }

  /** Cancel the jobs (each stops at a step boundary, resumable), then stop serving. */
  async close(): Promise<void> {
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    await this.jobs.cancelAll();
    for (const sock of this.sockets) sock.destroy();
    await closed;
    for (const p of this.paths) fs.rmSync(p, { force: true });
  }
}
