/**
 * A small typed event emitter: listeners are checked against the event's
 * argument type, which Node's EventEmitter cannot do. A listener that throws
 * is a bug of the listener; it must not stop the job that emitted, so the
 * error is traced and the other listeners still run.
 */
import { tracer } from '../trace.js';

const trace = tracer('jobs');

export class Emitter<Events extends Record<string, unknown>> {
  private readonly listeners = new Map<keyof Events, Set<(arg: never) => void>>();

  on<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener as (arg: never) => void);
    return () => this.off(event, listener);
  }

  off<K extends keyof Events>(event: K, listener: (arg: Events[K]) => void): void {
    this.listeners.get(event)?.delete(listener as (arg: never) => void);
  }

  emit<K extends keyof Events>(event: K, arg: Events[K]): void {
    for (const l of [...(this.listeners.get(event) ?? [])]) {
      try {
        (l as (arg: Events[K]) => void)(arg);
      } catch (err) {
        trace('listener of %s threw: %s', String(event), (err as Error).message);
      }
    }
  }
}
