/** Counters of an open chain, as `vdisk mount --stats` prints them and the library API returns them. */
import type { BlockNode, CopyOnReadStats } from './block/node.js';
import { chainOf } from './block/graph.js';
import { HttpDriver, type HttpStats } from './drivers/http/index.js';

/** What a chain's top node has done so far. */
export interface ImageStats {
  /** The top node's copy-on-read counters. */
  copyOnRead: CopyOnReadStats;
  /** Summed over every http(s) node of the chain. */
  http: HttpStats;
}

/** A copy: later requests do not change it. */
export function imageStats(top: BlockNode): ImageStats {
  const http: HttpStats = { requests: 0, bytesFetched: 0, retries: 0 };
  for (const n of chainOf(top)) {
    if (n.driver instanceof HttpDriver) {
      http.requests += n.driver.stats.requests;
      http.bytesFetched += n.driver.stats.bytesFetched;
      http.retries += n.driver.stats.retries;
    }
  }
  return { copyOnRead: { ...top.corStats }, http };
}
