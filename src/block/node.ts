/**
 * A node of the block graph: one driver instance plus what the generic layer
 * keeps for it (limits, tracked requests, the in-flight count, the backing
 * link and per-node policy). Chains are top -> backing -> ...; nothing assumes
 * a chain of one.
 */
import type { BlockDriver, BlockLimits, ChildLink } from './driver.js';
import { resolveLimits } from './limits.js';
import { RequestTracker } from './tracked-requests.js';
import { VdiskError, notSupported } from '../errors.js';

export type DetectZeroes = 'off' | 'on' | 'unmap';
export type DiscardMode = 'ignore' | 'unmap';

export interface NodeOptions {
  /** A name for traces and messages (the file name, usually). */
  name?: string;
  backing?: BlockNode | null;
  /** Turn writes of all-zero data into write-zeroes (with unmap if 'unmap'). */
  detectZeroes?: DetectZeroes;
  /** 'ignore' drops discards and never unmaps on write-zeroes (QEMU's discard=ignore). */
  discard?: DiscardMode;
  /** Reads of ranges this node lacks copy them in from the backing chain. */
  copyOnRead?: boolean;
}

export interface CopyOnReadStats {
  /** Bytes read through the chain because this node lacked them. */
  bytesFromBacking: number;
  /** Bytes written into this node by copy-on-read. */
  bytesCopied: number;
  /** Copy-on-read writes that failed (the reads themselves did not). */
  copyFailures: number;
}

/** A write, write-zeroes or discard landing on a node: the range its caller asked for. */
export interface WriteEvent {
  kind: 'write' | 'zero' | 'discard';
  offset: number;
  bytes: number;
}

/**
 * Hears every write, write-zeroes and discard on a node (a mirror's dirty
 * bitmap, a backup job). Copy-on-read copies are not heard: they change no content.
 */
export interface WriteNotifier {
  /** Once the request's conflicts are done, before the driver sees it; the request waits for a returned promise. */
  before?(ev: WriteEvent): void | Promise<void>;
  /** After the driver answered; with `error` when it failed (part of the range may have changed anyway). */
  after?(ev: WriteEvent, error?: unknown): void;
}

export class BlockNode {
  readonly driver: BlockDriver;
  readonly name: string;
  readonly limits: BlockLimits;
  readonly tracker = new RequestTracker();
  backing: BlockNode | null;
  detectZeroes: DetectZeroes;
  discard: DiscardMode;
  copyOnRead: boolean;
  readonly corStats: CopyOnReadStats = { bytesFromBacking: 0, bytesCopied: 0, copyFailures: 0 };
  /** @internal Bytes of copy-on-read writes still on their way after their reads were answered (io.ts). */
  corBytesTrailing = 0;
  /** @internal read by io.ts on every write; replaced, never mutated, so a notification in progress keeps its list. */
  writeNotifiers: readonly WriteNotifier[] = [];
  private inFlight = 0;
  private drainWaiters: Array<() => void> = [];

  constructor(driver: BlockDriver, options: NodeOptions = {}) {
    this.driver = driver;
    this.name = options.name ?? driver.formatName;
    this.limits = resolveLimits(driver);
    this.backing = options.backing ?? null;
    this.detectZeroes = options.detectZeroes ?? 'off';
    this.discard = options.discard ?? 'unmap';
    this.copyOnRead = options.copyOnRead ?? false;
    driver.attach?.(this);
    const size = driver.size();
    if (size % this.limits.requestAlignment !== 0) {
      throw new VdiskError('EINVAL', `${this.name}: size ${size} is not a multiple of its request alignment`);
    }
  }

  /** Every node below this one, with the role it plays: the driver's own children, then the backing node. */
  children(): ChildLink[] {
    const out = this.driver.children?.() ?? [];
    return this.backing ? [...out, { role: 'backing', node: this.backing }] : out;
  }

  get readOnly(): boolean {
    return this.driver.readOnly;
  }

  size(): number {
    return this.driver.size();
  }

  /** @internal request-layer bookkeeping (io.ts). */
  incInFlight(): void {
    this.inFlight++;
  }

  /** @internal */
  decInFlight(): void {
    if (--this.inFlight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** Hear every write, write-zeroes and discard from now on; returns the function that stops it. */
  addWriteNotifier(notifier: WriteNotifier): () => void {
    this.writeNotifiers = [...this.writeNotifiers, notifier];
    return () => {
      this.writeNotifiers = this.writeNotifiers.filter((n) => n !== notifier);
    };
  }

  /** Resolves once no request is in flight on this node. */
  drain(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /**
   * Change the size of the node's storage (a protocol node under a format).
   * Counted as a request in flight, so a drain waits for it.
   */
  async truncate(size: number): Promise<void> {
    if (!this.driver.truncate) throw notSupported(`truncate on ${this.name}`);
    this.incInFlight();
    try {
      await this.driver.truncate(size);
    } finally {
      this.decInFlight();
    }
  }

  /** Bytes of host storage the node uses (st_blocks); its size when the driver cannot tell. */
  async allocatedBytes(): Promise<number> {
    return (await this.driver.allocatedBytes?.()) ?? this.size();
  }

  /** Drain, close the driver, then the backing chain below. */
  async close(): Promise<void> {
    await this.drain();
    await this.driver.close();
    if (this.backing) await this.backing.close();
  }
}
