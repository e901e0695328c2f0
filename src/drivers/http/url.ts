/**
 * How image names are shown, and how a URL's secrets are kept out of sight.
 * A URL may carry secrets (user:password, a signed query string), so every
 * message and trace names an image by its display form: scheme, host and path
 * only. Local file names are shown as they are.
 */
import { VdiskError } from '../../errors.js';
import { addSecret } from '../../secrets.js';

/** The URL as it may be shown: no credentials, no query, no fragment. */
export function displayUrl(url: string | URL): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '<bad url>';
  }
}

/** `scheme://` at the start of a location: the one test of "is this a URL" (registry, display). */
export const URL_SCHEME = /^([a-z][a-z0-9+.-]*:)\/\//i;

/**
 * A file name as it is, a URL as it may be shown (displayUrl). Any scheme
 * counts, not only the ones vdisk opens: `ftp://user:pw@host/x` given by
 * mistake is shown without its password too.
 */
export function displayName(name: string): string {
  return URL_SCHEME.test(name) ? displayUrl(name) : name;
}

/**
 * The headers every request to `url` carries: ours, the caller's, and the
 * URL's credentials as an Authorization header. The credentials leave `url`
 * (it is changed in place), so the URL can be shown; they, the query string
 * and every header value but the user agent are registered as secrets that
 * traces and error lines mask (secrets.ts).
 */
export function requestHeaders(url: URL, extra: Record<string, string> = {}): Record<string, string> {
  const headers: Record<string, string> = { 'user-agent': 'vdisk', ...extra };
  if (url.username || url.password) {
    const cred = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
    headers['authorization'] ??= `Basic ${Buffer.from(cred).toString('base64')}`;
    addSecret(url.password);
    addSecret(decodeURIComponent(url.password));
    url.username = '';
    url.password = '';
  }
  // Whatever slips past the display form is masked in traces and error lines.
  addSecret(url.search.slice(1));
  for (const [name, value] of Object.entries(headers)) {
    if (name !== 'user-agent') addSecret(value);
    checkHeader(name, value);
  }
  return headers;
}

/**
 * A header undici would refuse, refused first as a usage error (undici's error has no
 * code of ours). Neither the value nor a bad name is quoted: either may hold a credential.
 */
function checkHeader(name: string, value: string): void {
  if (!/^[!#$%&'*+.^_`|~0-9a-z-]+$/i.test(name)) throw new VdiskError('ERR_USAGE', 'an HTTP header name has a character HTTP does not allow in names');
  if (/[\0-\x08\x0a-\x1f\x7f]/.test(value)) throw new VdiskError('ERR_USAGE', `the value of HTTP header '${name}' has a control character (a line break?)`);
}
