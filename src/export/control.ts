/**
 * A mount's control socket: other vdisk commands ask the process that has an
 * image open to run jobs on it (the image is locked against second writers).
 * Newline-delimited JSON; the socket lives in a runtime directory, keyed by the
 * image's real path.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { BlockNode } from '../block/node.js';
import { streamImage } from '../jobs/stream.js';
import { codeOf } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('control');

export function controlSocketPath(imageRealPath: string): string {
  const base = process.env['XDG_RUNTIME_DIR'] ?? path.join(os.tmpdir(), `vdisk-${process.getuid?.() ?? 0}`);
  const hash = crypto.createHash('sha256').update(imageRealPath).digest('hex').slice(0, 24);
  return path.join(base, 'vdisk', `${hash}.sock`);
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
    const socketPath = controlSocketPath(imageRealPath);
    fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o700 });
    fs.rmSync(socketPath, { force: true }); // a stale one: we hold the image lock, so nobody else serves it
    const server = net.createServer();
    const ctl = new ControlServer(server, socketPath);
    server.on('connection', (sock) => ctl.serve(top, sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
    fs.chmodSync(socketPath, 0o600);
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
