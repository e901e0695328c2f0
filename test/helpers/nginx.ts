/** A real nginx on 127.0.0.1, serving a directory, with an access log that counts bytes sent. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number, proc: ChildProcess, errorLog: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`nginx exited: ${fs.existsSync(errorLog) ? fs.readFileSync(errorLog, 'utf8') : ''}`);
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1');
      c.on('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nginx did not listen on ${port}`);
    await new Promise((r) => setImmediate(r));
  }
}

export class Nginx {
  readonly port: number;
  readonly dir: string;
  private readonly proc: ChildProcess;

  private readonly tls: boolean;

  private constructor(port: number, dir: string, proc: ChildProcess, tls: boolean) {
    this.tls = tls;
    this.port = port;
    this.dir = dir;
    this.proc = proc;
  }

  /** With `tls`, nginx speaks HTTPS with that certificate and key (PEM files). */
  static async start(root: string, workDir: string, tls?: { cert: string; key: string }): Promise<Nginx> {
    const dir = fs.mkdtempSync(path.join(workDir, 'nginx-'));
    const port = await freePort();
    const conf = path.join(dir, 'nginx.conf');
    fs.writeFileSync(
      conf,
      `user root;
worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log;
events { worker_connections 256; }
http {
  log_format bytes '$request_method $status $bytes_sent $body_bytes_sent "$http_range"';
  access_log ${dir}/access.log bytes;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  keepalive_requests 100000;
  sendfile on;
  server {
    listen 127.0.0.1:${port}${tls ? ' ssl' : ''};
    ${tls ? `ssl_certificate ${tls.cert}; ssl_certificate_key ${tls.key};` : ''}
    root ${root};
    # The same files, slowly: for jobs that must still be running when a test stops them.
    location /slow/ { alias ${root}/; limit_rate 4m; }
  }
}
`,
    );
    const proc = spawn('nginx', ['-c', conf, '-p', dir], { stdio: 'ignore' });
    await waitForPort(port, proc, path.join(dir, 'error.log'));
    return new Nginx(port, dir, proc, Boolean(tls));
  }

  /** `slow`: the file at 4 MB/s per connection. */
  url(file: string, slow = false): string {
    return `${this.tls ? 'https' : 'http'}://127.0.0.1:${this.port}/${slow ? 'slow/' : ''}${file}`;
  }

  /** Body bytes sent so far, from the access log. */
  bodyBytesSent(): number {
    const log = path.join(this.dir, 'access.log');
    if (!fs.existsSync(log)) return 0;
    return fs
      .readFileSync(log, 'utf8')
      .split('\n')
      .filter(Boolean)
      .reduce((n, line) => n + Number(line.split(' ')[3] ?? 0), 0);
  }

  requests(): string[] {
    const log = path.join(this.dir, 'access.log');
    return fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter(Boolean) : [];
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode !== null) return;
    const exited = new Promise((resolve) => this.proc.on('exit', resolve));
    this.proc.kill('SIGQUIT');
    await exited;
  }
}
