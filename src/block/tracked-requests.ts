/**
 * Tracked requests: every request in flight on a node is registered with its
 * byte range. A serialising request (read-modify-write padding, and later
 * copy-on-read and cluster allocation) must not interleave with any
 * overlapping request: it waits for them, and they wait for it. Its overlap
 * window is widened to an alignment (the block or cluster it rewrites).
 *
 * JS runs one handler at a time, so begin/end need no locking; waiting is an
 * await on the other request's completion promise.
 */

export type RequestKind = 'read' | 'write' | 'zero' | 'discard';

export class TrackedRequest {
  readonly offset: number;
  readonly bytes: number;
  readonly kind: RequestKind;
  serialising = false;
  overlapOffset: number;
  overlapBytes: number;
  /** The request this one is currently waiting for, if any. */
  waitingFor: TrackedRequest | null = null;
  // Made only when someone waits: most requests never conflict, and a promise
  // per request is measurable on the 4k path.
  private donePromise: Promise<void> | null = null;
  private resolveDone: (() => void) | null = null;
  private finished = false;

  constructor(offset: number, bytes: number, kind: RequestKind) {
    this.offset = offset;
    this.bytes = bytes;
    this.kind = kind;
    this.overlapOffset = offset;
    this.overlapBytes = bytes;
  }

  /** Resolves when the request ends. */
  get done(): Promise<void> {
    if (this.finished) return Promise.resolve();
    this.donePromise ??= new Promise<void>((resolve) => (this.resolveDone = resolve));
    return this.donePromise;
  }

  /** @internal */
  finish(): void {
    this.finished = true;
    this.resolveDone?.();
  }

  overlaps(offset: number, bytes: number): boolean {
    return offset < this.overlapOffset + this.overlapBytes && this.overlapOffset < offset + bytes;
  }
}

export class RequestTracker {
  private readonly requests = new Set<TrackedRequest>();
  private serialisingInFlight = 0;

  get inFlight(): number {
    return this.requests.size;
  }

  begin(offset: number, bytes: number, kind: RequestKind): TrackedRequest {
    const req = new TrackedRequest(offset, bytes, kind);
    this.requests.add(req);
    return req;
  }

  end(req: TrackedRequest): void {
    if (!this.requests.delete(req)) return;
    if (req.serialising) this.serialisingInFlight--;
    req.finish();
  }

  /** Make `req` serialising, its window widened to whole `align`-sized blocks. */
  markSerialising(req: TrackedRequest, align: number): void {
    const start = Math.floor(req.offset / align) * align;
    const end = Math.ceil((req.offset + req.bytes) / align) * align;
    if (!req.serialising) {
      req.serialising = true;
      this.serialisingInFlight++;
    }
    // Only ever widen: a request widened for cluster allocation keeps that window.
    const oldEnd = req.overlapOffset + req.overlapBytes;
    req.overlapOffset = Math.min(req.overlapOffset, start);
    req.overlapBytes = Math.max(oldEnd, end) - req.overlapOffset;
  }

  private findConflict(self: TrackedRequest): TrackedRequest | null {
    for (const other of this.requests) {
      if (other === self || (!other.serialising && !self.serialising)) continue;
      if (!other.overlaps(self.overlapOffset, self.overlapBytes)) continue;
      // A request that waits (possibly for us) is passed over: it will re-check
      // once it wakes, and waiting for it here could deadlock.
      if (other.waitingFor === null) return other;
    }
    return null;
  }

  /** Wait until no conflicting request is in flight. Fast path: nothing serialising anywhere. */
  async waitSerialising(req: TrackedRequest): Promise<boolean> {
    if (this.serialisingInFlight === 0) return false;
    let waited = false;
    for (;;) {
      const conflict = this.findConflict(req);
      if (!conflict) break;
      req.waitingFor = conflict;
      await conflict.done;
      req.waitingFor = null;
      waited = true;
    }
    return waited;
  }
}
