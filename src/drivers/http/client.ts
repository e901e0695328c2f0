/**
 * The undici client of one remote image: a keep-alive connection pool that
 * trusts the system's CAs (plus --ca-file), follows redirects but never from
 * https to plain http, and bounds the wait for headers and between body
 * chunks by --http-timeout. And how a TLS failure is told to the user.
 */
import fs from 'node:fs';
import { Agent, interceptors, type Dispatcher } from 'undici';
import { VdiskError } from '../../errors.js';
import { displayUrl } from './url.js';

/** Debian's system CA store (ca-certificates). */
const SYSTEM_CA_BUNDLE = '/etc/ssl/certs/ca-certificates.crt';

export interface ClientOptions {
  /** PEM file with more CA certificates to trust, besides the system's. */
  caFile?: string | undefined;
  /** Accept any TLS certificate. */
  insecure?: boolean | undefined;
  /** Time to the response headers, and between body chunks. */
  timeoutMs: number;
  maxRedirects: number;
  connections: number;
}

/** The dispatcher every request for `url` (named `name` in messages) goes through. */
export function createClient(url: URL, name: string, options: ClientOptions): Dispatcher {
  const connect: Record<string, unknown> = {};
  // Trust the system's CA store (Node otherwise uses its own bundle), plus --ca-file.
  const cas: Buffer[] = [];
  if (fs.existsSync(SYSTEM_CA_BUNDLE)) cas.push(fs.readFileSync(SYSTEM_CA_BUNDLE));
  if (options.caFile) cas.push(fs.readFileSync(options.caFile));
  if (cas.length) connect['ca'] = cas;
  if (options.insecure) connect['rejectUnauthorized'] = false;
  return new Agent({
    connections: options.connections,
    keepAliveTimeout: 30_000,
    headersTimeout: options.timeoutMs,
    bodyTimeout: options.timeoutMs,
    connect,
  }).compose([
    // Below the redirect interceptor, so that it sees every hop.
    ...(url.protocol === 'https:' ? [httpsOnly(name)] : []),
    interceptors.redirect({ maxRedirections: options.maxRedirects }),
  ]);
}

/**
 * Redirects may not leave https. An https URL promises that what is read
 * comes from that server unaltered; a `Location: http://...` (a misconfigured
 * mirror, or anyone on the path of a redirecting server) would silently hand
 * the image to whoever can touch plain-text traffic. (Stricter than curl and
 * QEMU's curl driver, which follow such a redirect.)
 *
 * An undici interceptor placed below the redirect one (compose(this, redirect)),
 * so that it sees the request of every hop: one for an origin that is not
 * https fails with ERR_HTTP, before anything is sent there.
 */
export function httpsOnly(name: string): Dispatcher.DispatcherComposeInterceptor {
  return (dispatch) => (opts, handler) => {
    const target = new URL(opts.path, opts.origin);
    if (target.protocol === 'https:') return dispatch(opts, handler);
    const err = new VdiskError('ERR_HTTP', `${name}: redirected to ${displayUrl(target)}; refusing to leave https for plain ${target.protocol.replace(':', '')}`);
    // Answered like any failed request, but not from inside this call: undici's redirect handler
    // calls dispatch while it is still finishing the previous hop's answer.
    queueMicrotask(() => handler.onResponseError?.(null as unknown as Dispatcher.DispatchController, err));
    return true;
  };
}

/** A certificate that does not verify, said plainly with what to do about it; null for other errors. */
export function explainTls(name: string, err: unknown): VdiskError | null {
  const code = (err as { code?: string }).code ?? '';
  if (!/CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|ERR_TLS/.test(code)) return null;
  return new VdiskError('ERR_HTTP_TLS', `${name}: TLS: ${(err as Error).message} (${code}); --ca-file FILE trusts a CA, --insecure skips the check`, { cause: err });
}
