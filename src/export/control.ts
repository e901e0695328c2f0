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
  private running = false;

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
      if (this.running) {
        send({ type: 'error', code: 'EBUSY', message: 'a stream job is already running on this image' });
        sock.end();
        return;
      }
      this.running = true;
      const abort = new AbortController();
      sock.on('close', () => abort.abort());
      trace('stream requested dropBacking=%s', Boolean(req.dropBacking));
      let last = 0;
      streamImage(top, {
        dropBacking: Boolean(req.dropBacking),
        signal: abort.signal,
        onProgress: (p) => {
          if (Date.now() - last < 200 && p.done < p.total) return;
          last = Date.now();
          send({ type: 'progress', ...p });
        },
      })
        .then((r) => send({ type: 'done', ...r }))
        .catch((err: unknown) => send({ type: 'error', code: codeOf(err), message: (err as Error).message }))
        .finally(() => {
          this.running = false;
          sock.end();
        });
    });
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.rmSync(this.path, { force: true });
  }
}
