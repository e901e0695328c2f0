/** Counters of an open chain, as `vdisk mount --stats` prints them and the library API returns them. */
import type { BlockNode, CopyOnReadStats } from './block/node.js';
import { chainOf } from './block/graph.js';
import type { NetworkStats } from './block/driver.js';

/** What a chain's top node has done so far. */
export interface ImageStats {
  /** The top node's copy-on-read counters. */
  copyOnRead: CopyOnReadStats;
  /** Summed over every network node of the chain (http, https). */
  http: NetworkStats;
}

/** A copy: later requests do not change it. */
export function imageStats(top: BlockNode): ImageStats {
  const http: NetworkStats = { requests: 0, bytesFetched: 0, retries: 0 };
  for (const n of chainOf(top)) {
    const net = n.driver.networkStats;
    if (!net) continue;
    http.requests += net.requests;
    http.bytesFetched += net.bytesFetched;
    http.retries += net.retries;
  }
  return { copyOnRead: { ...top.corStats }, http };
}
