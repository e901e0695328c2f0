/**
 * A bounded cache of cluster-sized metadata tables (L2 tables, refcount
 * blocks), write-back: changes stay in memory, marked dirty, until the driver
 * writes them out in its flush sequence (which orders refcounts before L2).
 * Memory is bounded by `maxTables`, not by the disk size: only clean tables
 * are evicted; when too many are dirty the owner flushes (see `wantsFlush`).
 */
import type { BlockNode } from '../../block/node.js';
import * as io from '../../block/io.js';
import { tracer } from '../../trace.js';

const trace = tracer('qcow2');

interface Entry {
  table: Buffer;
  dirty: boolean;
}

export class TableCache {
  readonly name: string;
  private readonly file: BlockNode;
  private readonly tableBytes: number;
  private readonly maxTables: number;
  // Map iteration order is insertion order: re-inserting on use makes it an LRU.
  private readonly entries = new Map<number, Entry>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private dirtyCount = 0;

  constructor(name: string, file: BlockNode, tableBytes: number, maxTables: number) {
    this.name = name;
    this.file = file;
    this.tableBytes = tableBytes;
    this.maxTables = Math.max(4, maxTables);
  }

  /** True when so many tables are dirty that the owner should flush. */
  get wantsFlush(): boolean {
    return this.dirtyCount >= this.maxTables / 2;
  }

  get hasDirty(): boolean {
    return this.dirtyCount > 0;
  }

  /** The cached table, if present (no I/O). */
  peek(offset: number): Buffer | undefined {
    const e = this.entries.get(offset);
    if (!e) return undefined;
    this.entries.delete(offset);
    this.entries.set(offset, e);
    return e.table;
  }

  /** The table at `offset` in the image file, loaded if needed. */
  async get(offset: number): Promise<Buffer> {
    const cached = this.peek(offset);
    if (cached) return cached;
    const pending = this.loading.get(offset);
    if (pending) return pending;
    const load = (async () => {
      const table = Buffer.allocUnsafe(this.tableBytes);
      await io.preadv(this.file, offset, this.tableBytes, [table]);
      return table;
    })();
    this.loading.set(offset, load);
    try {
      const table = await load;
      // Someone may have installed a fresh table meanwhile (a new allocation): theirs wins.
      const existing = this.entries.get(offset);
      if (existing) return existing.table;
      this.insert(offset, { table, dirty: false });
      return table;
    } finally {
      this.loading.delete(offset);
    }
  }

  /** Put a table that exists only in memory so far (a new L2 table or refcount block). */
  install(offset: number, table: Buffer): void {
    const old = this.entries.get(offset);
    if (old?.dirty) this.dirtyCount--;
    this.entries.delete(offset);
    this.insert(offset, { table, dirty: true });
    this.dirtyCount++;
  }

  /** `table` is the buffer get() returned; it is put back if it was evicted meanwhile. */
  markDirty(offset: number, table: Buffer): void {
    const e = this.entries.get(offset);
    if (!e || e.table !== table) return this.install(offset, table);
    if (!e.dirty) {
      e.dirty = true;
      this.dirtyCount++;
    }
  }

  /** Forget a table (its cluster was freed). */
  drop(offset: number): void {
    const e = this.entries.get(offset);
    if (e?.dirty) this.dirtyCount--;
    this.entries.delete(offset);
  }

  private insert(offset: number, entry: Entry): void {
    this.entries.set(offset, entry);
    if (this.entries.size <= this.maxTables) return;
    for (const [off, e] of this.entries) {
      if (this.entries.size <= this.maxTables) break;
      if (!e.dirty && off !== offset) this.entries.delete(off);
    }
  }

  /** Write every dirty table, in offset order. The caller orders caches and flushes. */
  async writeDirty(): Promise<number> {
    const dirty = [...this.entries].filter(([, e]) => e.dirty).sort((a, b) => a[0] - b[0]);
    for (const [offset, e] of dirty) {
      // Clear first: a change made while the write is in flight marks it dirty again.
      e.dirty = false;
      this.dirtyCount--;
      try {
        await io.pwritev(this.file, offset, this.tableBytes, [Buffer.from(e.table)]);
      } catch (err) {
        if (!e.dirty) {
          e.dirty = true;
          this.dirtyCount++;
        }
        throw err;
      }
    }
    if (dirty.length) trace('cache %s wrote %d tables', this.name, dirty.length);
    return dirty.length;
  }
}
