/** Trace points: one `debug` namespace per layer, `DEBUG=vdisk:*` shows them all (docs/TRACING.md). */
import createDebug from 'debug';

export type Tracer = createDebug.Debugger;

export function tracer(layer: string): Tracer {
  return createDebug(`vdisk:${layer}`);
}
