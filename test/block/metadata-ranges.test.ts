/** The qcow2 metadata range set against a per-cluster model: same answers after any adds and removes. */
import { describe, expect, it } from 'vitest';
import { MetadataRanges, type MetadataKind } from '../../src/drivers/qcow2/metadata-ranges.js';
import { rng } from '../helpers/workload.js';

const KINDS: MetadataKind[] = ['L1 table', 'L2 table', 'refcount table', 'refcount block', 'snapshot L1 table'];
const SHAREABLE = new Set<MetadataKind>(['L2 table', 'refcount block', 'snapshot L1 table']);
const CS = 512;

describe('qcow2 metadata ranges', () => {
  it('answers like a per-cluster map through 5000 seeded adds and removes, with merged runs', () => {
    const rand = rng(9);
    const r = new MetadataRanges(CS);
    const model = new Map<number, MetadataKind>();
    for (let step = 0; step < 5000; step++) {
      const start = Math.floor(rand() * 300);
      const n = 1 + Math.floor(rand() * (rand() < 0.8 ? 2 : 12));
      if (rand() < 0.6) {
        const kind = KINDS[Math.floor(rand() * KINDS.length)]!;
        let expected: MetadataKind | null = null;
        for (let c = start; c < start + n; c++) {
          const k = model.get(c);
          if (k && !expected && !(k === kind && SHAREABLE.has(kind))) expected = k;
          if (!k) model.set(c, kind);
        }
        expect(r.add(start * CS, n * CS, kind)?.kind ?? null).toBe(expected);
      } else {
        r.remove(start * CS, n * CS);
        for (let c = start; c < start + n; c++) model.delete(c);
      }
      const q = Math.floor(rand() * 310);
      const qn = 1 + Math.floor(rand() * 4);
      let first: { kind: MetadataKind; offset: number } | null = null;
      for (let c = q; c < q + qn && !first; c++) if (model.has(c)) first = { kind: model.get(c)!, offset: c * CS };
      // A query in the middle of a cluster covers that cluster.
      expect(r.find(q * CS + 100, qn * CS - 100)).toEqual(first);
    }
    // Runs are merged: never more runs than maximal same-kind stretches.
    let stretches = 0;
    for (let c = 0; c < 320; c++) if (model.has(c) && model.get(c - 1) !== model.get(c)) stretches++;
    expect(r.size).toBe(stretches);
  });

  it('assertFree throws the corruption error naming both sides; ignore skips a kind', () => {
    const r = new MetadataRanges(CS);
    r.add(4 * CS, 2 * CS, 'refcount table');
    expect(() => r.assertFree(5 * CS, CS, 'a new cluster')).toThrow(/a new cluster at 2560 overlaps the refcount table at 2560/);
    expect(() => r.assertFree(6 * CS, 10 * CS, 'a new cluster')).not.toThrow();
    expect(r.find(4 * CS, CS, 'refcount table')).toBeNull();
  });
});
