/** Trace points: one `debug` namespace per layer, `DEBUG=vdisk:*` shows them all (docs/TRACING.md). */
import { formatWithOptions, type InspectOptions } from 'node:util';
import createDebug from 'debug';
import { redact } from './secrets.js';

export type Tracer = createDebug.Debugger;

/** As debug's own Node logger, with secrets taken out (secrets.ts): traces are pasted into bug reports. */
function log(...args: unknown[]): void {
  const options = (createDebug as { inspectOpts?: InspectOptions }).inspectOpts ?? {};
  process.stderr.write(`${redact(formatWithOptions(options, ...args))}\n`);
}

export function tracer(layer: string): Tracer {
  const trace = createDebug(`vdisk:${layer}`);
  trace.log = log;
  return trace;
}
