/**
 * The last line of defence against secrets on the terminal. Messages and
 * traces name remote images by their display form (drivers/http/url.ts);
 * this catches what slips past that rule, e.g. a third-party error that
 * quotes a URL: traces (trace.ts) and the CLI's error line (cli/util.ts) pass
 * through redact(), which drops the user:password and query of any URL in the
 * text and masks every value registered with addSecret() (HTTP header values,
 * URL passwords).
 */
const secrets = new Set<string>();

/** Shorter values are not masked: they would mask ordinary words and numbers. */
const MIN_SECRET_LENGTH = 4;

/** scheme://[userinfo@]rest[?query][#fragment]; userinfo cannot hold '/', so a path's '@' is left alone. */
const URL_IN_TEXT = /\b([a-z][a-z0-9+.-]*:\/\/)(?:[^\s/?#@]*@)?([^\s?#]*)(?:\?[^\s#]*)?(?:#\S*)?/gi;

export function addSecret(value: string | undefined): void {
  if (value && value.length >= MIN_SECRET_LENGTH) secrets.add(value);
}

export function redact(text: string): string {
  let out = text.replace(URL_IN_TEXT, (_all, scheme: string, rest: string) => `${scheme}${rest}`);
  for (const s of secrets) if (out.includes(s)) out = out.split(s).join('<secret>');
  return out;
}
