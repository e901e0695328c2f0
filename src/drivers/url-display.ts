/**
 * How image names are shown. A URL may carry secrets (user:password, a signed
 * query string), so every message and trace names an image by its display
 * form: scheme, host and path only. Local file names are shown as they are.
 */

/** The URL as it may be shown: no credentials, no query, no fragment. */
export function displayUrl(url: string | URL): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '<bad url>';
  }
}

export function isHttpUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

/**
 * A file name as it is, a URL as it may be shown (displayUrl). Any scheme
 * counts, not only the ones vdisk opens: `ftp://user:pw@host/x` given by
 * mistake is shown without its password too.
 */
export function displayName(name: string): string {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(name) ? displayUrl(name) : name;
}
