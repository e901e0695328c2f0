/**
 * Operations on the block graph that jobs need, for any format: walk a chain,
 * change the backing file an image records, reopen a node read-write and
 * back, and swap the node under an export without losing a request or
 * answering one from the old node after the switch (a mirror's pivot).
 *
 * An export does not hold its node directly but a NodeRoot (QEMU's
 * BlockBackend): every request enters through it, which is what lets a drain
 * stop new requests while it waits for the ones in flight.
 */
import type { BlockNode } from './node.js';
import * as io from './io.js';
import { VdiskError } from '../errors.js';
import { tracer } from '../trace.js';

const trace = tracer('graph');

/** The nodes of a chain, top first. */
export function chainOf(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  for (let n: BlockNode | null = top; n; n = n.backing) out.push(n);
  return out;
}

/** The whole graph under `node` (children before the backing chain), each node once, with its role and depth. */
export function graphOf(node: BlockNode): Array<{ node: BlockNode; role: string; depth: number }> {
  const out: Array<{ node: BlockNode; role: string; depth: number }> = [];
  const seen = new Set<BlockNode>();
  const walk = (n: BlockNode, role: string, depth: number): void => {
    if (seen.has(n)) return;
    seen.add(n);
    out.push({ node: n, role, depth });
    for (const c of n.children()) walk(c.node, c.role, depth + 1);
  };
  walk(node, 'root', 0);
  return out;
}

/**
 * The export's (or a job's) handle on the node it serves. Requests run
 * through run(); drained() holds new ones back while it works.
 */
export class NodeRoot {
  private current: BlockNode;
  private inFlight = 0;
  private quiesced = 0;
  private idleWaiters: Array<() => void> = [];
  private resumeWaiters: Array<() => void> = [];

  constructor(node: BlockNode) {
    this.current = node;
  }

  get node(): BlockNode {
    return this.current;
  }

  /** Run one request on the current node; while a drain holds the root, it waits to start. */
  async run<T>(request: (node: BlockNode) => Promise<T>): Promise<T> {
    while (this.quiesced > 0) await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    this.inFlight++;
    try {
      return await request(this.current);
    } finally {
      if (--this.inFlight === 0) {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        for (const w of waiters) w();
      }
    }
  }

  /**
   * Stop new requests, wait for those in flight, run `work`, resume. Requests
   * that arrive meanwhile wait and then run, in order, on whatever node the
   * root holds afterwards.
   */
  async drained<T>(work: () => Promise<T>): Promise<T> {
    this.quiesced++;
    try {
      while (this.inFlight > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      return await work();
    } finally {
      if (--this.quiesced === 0) {
        const waiters = this.resumeWaiters;
        this.resumeWaiters = [];
        for (const w of waiters) w();
      }
    }
  }

  /** @internal replaceNode's. */
  swap(node: BlockNode): BlockNode {
    const old = this.current;
    this.current = node;
    return old;
  }
}

/**
 * Put `node` under `root` atomically: no request is lost, and none is
 * answered by the old node once the switch is made. The old node is flushed
 * (what it acknowledged is on disk) and returned open, for the caller to close.
 */
export async function replaceNode(root: NodeRoot, node: BlockNode): Promise<BlockNode> {
  if (node.size() !== root.node.size()) {
    throw new VdiskError('EINVAL', `cannot replace ${root.node.name} (${root.node.size()} bytes) with ${node.name} (${node.size()} bytes)`);
  }
  return root.drained(async () => {
    const old = root.node;
    if (!old.readOnly) await io.flush(old);
    await old.drain();
    root.swap(node);
    trace('replaced %s with %s', old.name, node.name);
    return old;
  });
}

/**
 * Record another backing file in `node`'s image (null: none), and link the
 * graph to match: `backing` (open, or null) becomes the node's backing node.
 * The old backing node is returned open, for the caller to close. The caller
 * has made sure the image's contents do not change by it (stream: nothing
 * reads through any more).
 */
export async function changeBackingFile(node: BlockNode, name: string | null, format: string | null, backing: BlockNode | null): Promise<BlockNode | null> {
  const drv = node.driver;
  if (!drv.changeBackingFile) throw new VdiskError('ERR_IMAGE_FORMAT', `${node.name}: ${drv.formatName} images cannot record a backing file`);
  if ((name === null) !== (backing === null)) throw new VdiskError('EINVAL', 'changeBackingFile: a backing file name needs its node, and no name no node');
  await drv.changeBackingFile(name, format);
  const old = node.backing;
  node.backing = backing;
  trace('%s: backing file now %s', node.name, name === null ? 'none' : backing!.name);
  return old;
}

/**
 * Reopen `node` read-write (or back to read-only), for a job that writes into
 * a backing node. What was written is flushed before it becomes read-only.
 */
export async function reopen(node: BlockNode, readOnly: boolean): Promise<void> {
  if (node.readOnly === readOnly) return;
  const drv = node.driver;
  if (!drv.reopen) throw new VdiskError('EROFS', `${node.name}: ${drv.formatName} nodes cannot be reopened ${readOnly ? 'read-only' : 'read-write'}`);
  await node.drain();
  if (readOnly) await io.flush(node);
  await drv.reopen(readOnly);
  trace('%s reopened %s', node.name, readOnly ? 'read-only' : 'read-write');
}
