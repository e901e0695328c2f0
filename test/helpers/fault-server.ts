/**
 * A real HTTP(S) server that misbehaves on purpose: drops connections mid-body,
 * answers 503, stalls, sends half a body and holds the rest back, trickles a
 * body byte by byte, lies in Content-Length, changes the ETag, ignores Range,
 * refuses HEAD, redirects (also to another server), claims absurd sizes,
 * demands credentials. Faults apply to the first `times` matching requests.
 */
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';

export type Fault = 'drop-mid-body' | '503' | 'stall' | 'hold-rest' | 'trickle' | 'short-length' | 'ignore-range' | 'no-head' | 'none';

export interface FaultServerOptions {
  data: Buffer;
  fault?: Fault;
  /** How many range GETs suffer the fault (Infinity: all). */
  times?: number;
  /** Require this Authorization header. */
  auth?: string;
  /** Serve under /redirect a 302 to /image, or to this URL. */
  redirect?: boolean | string;
  /** A weak ETag (W/"..."), which never matches an If-Range. */
  weakEtag?: boolean;
  /** Speak HTTPS with this certificate and key (PEM). */
  tls?: { cert: Buffer; key: Buffer };
  /** The total size sent in every Content-Range, instead of the data's length. */
  contentRangeTotal?: string;
  /** The Retry-After of the '503' fault (default '0'). */
  retryAfter?: string;
  /** 'trickle': one byte every this many ms (default 50). */
  trickleMs?: number;
}

export class FaultServer {
  readonly server: http.Server | https.Server;
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
  /** Every request, as 'METHOD url'. */
  readonly requests: string[] = [];

  constructor(private readonly options: FaultServerOptions) {
    this.data = options.data;
    this.etag = options.weakEtag ? 'W/"v1"' : '"v1"';
    this.faultsLeft = options.times ?? Infinity;
    const handle = (req: http.IncomingMessage, res: http.ServerResponse) => this.handle(req, res);
    this.server = options.tls ? https.createServer({ cert: options.tls.cert, key: options.tls.key }, handle) : http.createServer(handle);
    // 'connection' is the TCP socket for both: destroying it ends a TLS session too.
    this.server.on('connection', (s: net.Socket) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `${this.options.tls ? 'https' : 'http'}://127.0.0.1:${this.port}/image`;
  }

  /** The file changes: new contents and a new ETag. */
  change(): void {
    this.data = Buffer.from(this.data).fill(0xee, 0, Math.min(this.data.length, 1 << 20));
    this.etag = this.options.weakEtag ? 'W/"v2"' : '"v2"';
    this.lastModified = 'Sat, 21 Nov 2026 11:00:00 GMT';
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests.push(`${req.method} ${req.url}`);
    if (req.headers.authorization) this.seenAuth.push(req.headers.authorization);
    if (this.options.auth && req.headers.authorization !== this.options.auth) {
      res.writeHead(401).end();
      return;
    }
    if (this.options.redirect && req.url === '/redirect') {
      res.writeHead(302, { location: typeof this.options.redirect === 'string' ? this.options.redirect : '/image' }).end();
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
      res.writeHead(503, { 'retry-after': this.options.retryAfter ?? '0' }).end();
      return;
    }
    if (faulty && fault === 'stall') return; // never answer: the client's timeout must fire
    const total = this.options.contentRangeTotal ?? String(this.data.length);
    if (faulty && fault === 'short-length') {
      // Content-Range promises the range, Content-Length (and the body) one byte less.
      res.writeHead(206, { ...headers, 'content-range': `bytes ${start}-${end}/${total}`, 'content-length': body.length - 1 });
      res.end(body.subarray(0, body.length - 1));
      return;
    }
    res.writeHead(206, { ...headers, 'content-range': `bytes ${start}-${end}/${total}`, 'content-length': body.length });
    if (faulty && fault === 'trickle') {
      this.trickle(res, body);
      return;
    }
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

  /** One byte at a time, never idle long enough for an idle timeout: only a deadline on the whole answer ends it. */
  private trickle(res: http.ServerResponse, body: Buffer): void {
    let pos = 0;
    const timer = setInterval(() => {
      if (res.destroyed || pos >= body.length) {
        clearInterval(timer);
        if (!res.destroyed) res.end();
        return;
      }
      res.write(body.subarray(pos, pos + 1));
      this.bytesSent++;
      pos++;
    }, this.options.trickleMs ?? 50);
    res.on('close', () => clearInterval(timer));
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
