/**
 * A mount's control socket: other vdisk commands ask the process that has an
 * image open to run jobs on it (the image is locked against second writers).
 * Newline-delimited JSON; the socket lives in a runtime directory only the
 * user can write (private-dir.ts), keyed by the image's real path, and a
 * client trusts only a server of its own user or root (SO_PEERCRED).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { BlockNode } from '../block/node.js';
import { streamImage } from '../jobs/stream.js';
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
 * Connect to the mount serving an image, or null when none does. The answer
 * of a server run by another user is never trusted: she could have put her
 * socket where ours should be, and answer "done" to a stream never run.
 */
export async function connectControl(imageRealPath: string): Promise<net.Socket | null> {
  const dir = controlDir();
  if (!(await ensurePrivateDir(dir, { create: false }))) return null;
  const socketPath = controlSocketPath(imageRealPath, dir);
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

export interface ControlRequest {
  op: 'stream';
  dropBacking?: boolean;
}

export class ControlServer {
  private readonly server: net.Server;
  readonly path: string;
  /** The job running, and how to stop it: closing the mount must not wait for a whole stream. */
  private job: { abort: AbortController; done: Promise<void> } | null = null;
  private readonly sockets = new Set<net.Socket>();

  private constructor(server: net.Server, socketPath: string) {
    this.server = server;
    this.path = socketPath;
  }

  static async start(top: BlockNode, imageRealPath: string): Promise<ControlServer> {
    const dir = controlDir();
    await ensurePrivateDir(dir, { create: true });
    const socketPath = controlSocketPath(imageRealPath, dir);
    fs.rmSync(socketPath, { force: true }); // a stale one: we hold the image lock, so nobody else serves it
    const server = net.createServer();
    const ctl = new ControlServer(server, socketPath);
    server.on('connection', (sock) => ctl.serve(top, sock));
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
    trace('listening on %s', socketPath);
    return ctl;
  }

  private serve(top: BlockNode, sock: net.Socket): void {
    let buf = '';
    const send = (msg: object) => sock.writable && sock.write(`${JSON.stringify(msg)}\n`);
    sock.on('error', () => undefined);
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('data', (d) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      const line = buf.slice(0, nl);
      buf = '';
      let req: ControlRequest;
      try {
        req = JSON.parse(line) as ControlRequest;
      } catch {
        send({ type: 'error', code: 'ERR_USAGE', message: 'bad request' });
        sock.end();
        return;
      }
      if (req.op !== 'stream') {
        send({ type: 'error', code: 'ERR_USAGE', message: `unknown op ${String(req.op)}` });
        sock.end();
        return;
      }
      // A job whose client went away (Ctrl-C) is still finishing its step: the new one starts after it.
      if (this.job && !this.job.abort.signal.aborted) {
        send({ type: 'error', code: 'EBUSY', message: 'a stream job is already running on this image' });
        sock.end();
        return;
      }
      const stopping = this.job?.done;
      const abort = new AbortController();
      sock.on('close', () => abort.abort());
      trace('stream requested dropBacking=%s', Boolean(req.dropBacking));
      const job = { abort, done: Promise.resolve() };
      this.job = job;
      job.done = (async () => {
        await stopping;
        try {
          if (abort.signal.aborted) return;
          const r = await streamImage(top, { dropBacking: Boolean(req.dropBacking), signal: abort.signal, onProgress: (p) => send({ type: 'progress', ...p }) });
          send({ type: 'done', ...r });
        } catch (err) {
          send({ type: 'error', code: codeOf(err), message: (err as Error).message });
        } finally {
          if (this.job === job) this.job = null;
          sock.end();
        }
      })();
    });
  }

  /** Stop a running job (it stops at a step boundary, resumable), then the server. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.job) {
      this.job.abort.abort();
      await this.job.done;
    }
    for (const sock of this.sockets) sock.destroy();
    await closed;
    fs.rmSync(this.path, { force: true });
  }
}
