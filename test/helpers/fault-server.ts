/**
 * A real HTTP server that misbehaves on purpose: drops connections mid-body,
 * answers 503, stalls, sends half a body and holds the rest back, changes the
 * ETag, ignores Range, refuses HEAD, redirects,
 * demands credentials. Faults apply to the first `times` matching requests.
 */
import http from 'node:http';
import net from 'node:net';

export type Fault = 'drop-mid-body' | '503' | 'stall' | 'hold-rest' | 'ignore-range' | 'no-head' | 'none';

export interface FaultServerOptions {
  data: Buffer;
  fault?: Fault;
  /** How many range GETs suffer the fault (Infinity: all). */
  times?: number;
  /** Require this Authorization header. */
  auth?: string;
  /** Serve under /redirect a 302 to /image. */
  redirect?: boolean;
  /** A weak ETag (W/"..."), which never matches an If-Range. */
  weakEtag?: boolean;
}

export class FaultServer {
  readonly server: http.Server;
  port = 0;
  etag: string;
  lastModified = 'Sat, 21 Nov 2026 10:00:00 GMT';
  data: Buffer;
  /** Every range GET answered, in order: [start, end] inclusive. */
  readonly gets: Array<[number, number]> = [];
  /** Answers whose second half is held back until release(). */
  held: Array<() => void> = [];
  bytesSent = 0;
  private faultsLeft: number;
  private readonly sockets = new Set<net.Socket>();
  readonly seenAuth: string[] = [];

  constructor(private readonly options: FaultServerOptions) {
    this.data = options.data;
    this.etag = options.weakEtag ? 'W/"v1"' : '"v1"';
    this.faultsLeft = options.times ?? Infinity;
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `http://127.0.0.1:${this.port}/image`;
  }

  /** The file changes: new contents and a new ETag. */
  change(): void {
    this.data = Buffer.from(this.data).fill(0xee, 0, Math.min(this.data.length, 1 << 20));
    this.etag = this.options.weakEtag ? 'W/"v2"' : '"v2"';
    this.lastModified = 'Sat, 21 Nov 2026 11:00:00 GMT';
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (req.headers.authorization) this.seenAuth.push(req.headers.authorization);
    if (this.options.auth && req.headers.authorization !== this.options.auth) {
      res.writeHead(401).end();
      return;
    }
    if (this.options.redirect && req.url === '/redirect') {
      res.writeHead(302, { location: '/image' }).end();
      return;
    }
    const fault = this.options.fault ?? 'none';
    const headers = { etag: this.etag, 'last-modified': this.lastModified, 'accept-ranges': fault === 'ignore-range' ? 'none' : 'bytes' };
    if (req.method === 'HEAD') {
      if (fault === 'no-head') {
        res.writeHead(405).end();
        return;
      }
      res.writeHead(200, { ...headers, 'content-length': this.data.length }).end();
      return;
    }
    const m = /bytes=(\d+)-(\d+)/.exec(req.headers.range ?? '');
    if (!m || fault === 'ignore-range') {
      res.writeHead(200, { ...headers, 'content-length': this.data.length });
      this.streamAll(res);
      return;
    }
    const ifRange = req.headers['if-range'];
    // Strong comparison, as RFC 9110 asks: a weak tag never matches.
    if (ifRange && (ifRange.startsWith('W/') || (ifRange !== this.etag && ifRange !== this.lastModified))) {
      res.writeHead(200, { ...headers, 'content-length': this.data.length });
      res.end(this.data);
      return;
    }
    const start = Number(m[1]);
    const end = Math.min(Number(m[2]), this.data.length - 1);
    this.gets.push([start, end]);
    const body = this.data.subarray(start, end + 1);
    const faulty = start > 0 || end > 0 ? this.faultsLeft-- > 0 : false; // the 0-0 size probe is never faulted
    if (faulty && fault === '503') {
      res.writeHead(503, { 'retry-after': '0' }).end();
      return;
    }
    if (faulty && fault === 'stall') return; // never answer: the client's timeout must fire
    res.writeHead(206, { ...headers, 'content-range': `bytes ${start}-${end}/${this.data.length}`, 'content-length': body.length });
    if (faulty && fault === 'hold-rest') {
      res.write(body.subarray(0, body.length >> 1));
      this.held.push(() => res.end(body.subarray(body.length >> 1)));
      return;
    }
    if (faulty && fault === 'drop-mid-body') {
      res.write(body.subarray(0, body.length >> 1), () => res.socket?.destroy());
      return;
    }
    res.end(body);
    this.bytesSent += body.length;
  }

  /** The whole image, written as fast as the client takes it; counts what really left. */
  private streamAll(res: http.ServerResponse): void {
    let pos = 0;
    const pump = () => {
      while (pos < this.data.length && !res.destroyed) {
        const chunk = this.data.subarray(pos, pos + 65536);
        pos += chunk.length;
        this.bytesSent += chunk.length;
        if (!res.write(chunk)) {
          res.once('drain', pump);
          return;
        }
      }
      if (!res.destroyed) res.end();
    };
    pump();
  }

  /** Send the rest of every held-back answer. */
  release(): void {
    const held = this.held;
    this.held = [];
    for (const send of held) send();
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
