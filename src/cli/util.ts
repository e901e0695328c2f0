/** Shared CLI helpers: sizes, output, and the one-line error convention. */
import { VdiskError, codeOf } from '../errors.js';
import { redact } from '../secrets.js';

/** Sizes are parsed with every other number of the command line, in numbers.ts. */
export { parseSize } from './numbers.js';
export { formatSize } from '../size-text.js';

/** One line on stderr with a stable code; the stack only when DEBUG is set. */
export function reportError(err: unknown): void {
  const code = codeOf(err);
  const message = (err instanceof Error ? err.message : String(err)).replace(/\s*\n\s*/g, ' ');
  // redact(): messages name images by their display form already; this catches one that quotes a URL anyway.
  process.stderr.write(`vdisk: error ${code}: ${redact(message)}\n`);
  if (process.env['DEBUG'] && err instanceof Error && err.stack) process.stderr.write(`${redact(err.stack)}\n`);
}

export function exitCodeOf(err: unknown): number {
  return err instanceof VdiskError && err.code === 'ERR_USAGE' ? 2 : 1;
}
