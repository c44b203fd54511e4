import { describe, expect, it } from 'vitest';
import { clusterAdapters } from '../../src/compress/cluster-adapters.js';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import { factoredNormSquared } from '../../src/compress/slot-problem.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { Random } from '../../src/tensor/random.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 24, outFeatures: 24 },
  { path: 'model.layers.0.self_attn.v_proj', inFeatures: 24, outFeatures: 12 },
];

function twoFamilies(): { id: string; adapter: import('../../src/io/lora-types.js').LoraAdapter }[] {
  const first = syntheticAdapterSet({ slots: SLOTS, count: 5, rank: 3, sharedRank: 2, noise: 0.05, seed: 1, familySeed: 100, idPrefix: 'first-' });
  const second = syntheticAdapterSet({ slots: SLOTS, count: 5, rank: 3, sharedRank: 2, noise: 0.05, seed: 2, familySeed: 200, idPrefix: 'second-' });
  // interleave so the split is not just the input order
  return first.flatMap((entry, i) => [entry, second[i]!]);
}

describe('clustering', () => {
  it('separates two planted families (one cluster per adapter across all slots)', () => {
    const inputs = twoFamilies();
    const slots = SLOTS.map((slot) => ({
      ...slot, rank: 2,
      entries: inputs.map(({ adapter }, adapterIndex) => {
        const m = adapter.modules.get(slot.path)!;
        return { adapterIndex, rank: m.rank, scale: m.scale, a: m.a, b: m.b, normSquared: factoredNormSquared(m.a, m.b, m.rank, m.inFeatures, m.outFeatures, m.scale) };
      }),
    }));
    const { assignments, costHistory } = clusterAdapters(slots, inputs.length, 2, { method: 'jd-full', weighting: 'unit-norm', fit: { seed: 3 } });
    const firstCluster = assignments[0]!;
    inputs.forEach(({ id }, i) => expect(assignments[i]).toBe(id.startsWith('first-') ? firstCluster : 1 - firstCluster));
    for (let k = 1; k < costHistory.length; k++) expect(costHistory[k]!).toBeLessThanOrEqual(costHistory[k - 1]! + 1e-9);
  });

  it('with weighting none, scaling every adapter alike does not change the clusters (the margin is relative)', () => {
    const rng = new Random(902);
    const [inFeatures, outFeatures, rank, shared] = [24, 20, 2, 3];
    const normal = (n: number): Float64Array => Float64Array.from({ length: n }, () => rng.normal());
    const families = [0, 1].map(() => ({ u: normal(outFeatures * shared), v: normal(shared * inFeatures) }));
    const raw = Array.from({ length: 10 }, (_, i) => {
      const family = families[i % 2]!;
      const c = normal(shared * rank), d = normal(rank * shared);
      const b = new Float32Array(outFeatures * rank), a = new Float32Array(rank * inFeatures);
      const magnitude = Math.exp(3 * (rng.next() - 0.5));
      for (let o = 0; o < outFeatures; o++) for (let p = 0; p < rank; p++) {
        let sum = 0;
        for (let j = 0; j < shared; j++) sum += family.u[o * shared + j]! * c[j * rank + p]!;
        b[o * rank + p] = (sum + rng.normal()) * magnitude;
      }
      for (let p = 0; p < rank; p++) for (let k = 0; k < inFeatures; k++) {
        let sum = 0;
        for (let j = 0; j < shared; j++) sum += d[p * shared + j]! * family.v[j * inFeatures + k]!;
        a[p * inFeatures + k] = sum + rng.normal();
      }
      return { a, b };
    });
    const run = (scale: number) => clusterAdapters([{
      path: 'm.q', inFeatures, outFeatures, rank: 3,
      entries: raw.map(({ a, b }, adapterIndex) => ({ adapterIndex, rank, scale, a, b, normSquared: factoredNormSquared(a, b, rank, inFeatures, outFeatures, scale) })),
    }], raw.length, 2, { method: 'jd-full', weighting: 'none', fit: { seed: 1 } });
    expect(run(1e-7).assignments).toEqual(run(1).assignments);
  });

  it('compressAdapters with 2 clusters fits each family at its planted rank', async () => {
    const inputs = twoFamilies();
    const result = await compressAdapters(inputs, { method: 'jd-full', clusters: 2, maxError: 0.25, seed: 4 });
    const clusterOf = new Map(result.adapters.map((a) => [a.id, a.cluster]));
    expect(new Set(inputs.filter((x) => x.id.startsWith('first-')).map((x) => clusterOf.get(x.id))).size).toBe(1);
    expect(clusterOf.get('first-0')).not.toBe(clusterOf.get('second-0'));
    for (const slot of result.slots) {
      expect(slot.bases.map((b) => b?.rank)).toEqual([2, 2]);
      for (const entry of slot.adapters.values()) expect(entry.storage).toBe('compressed');
    }
  });

  it('gives the same bank whatever the order of the inputs (clusters, bases and cores bit for bit)', async () => {
    const inputs = twoFamilies();
    const shuffled = [...inputs].reverse();
    shuffled.push(shuffled.splice(3, 1)[0]!);
    const options = { method: 'jd-full' as const, clusters: 3, maxError: 0.3, seed: 4 };
    const [p, q] = [await compressAdapters(inputs, options), await compressAdapters(shuffled, options)];
    const clusterOf = (r: typeof p) => Object.fromEntries(r.adapters.map((a) => [a.id, a.cluster]));
    expect(clusterOf(q)).toEqual(clusterOf(p));
    for (const [s, slot] of p.slots.entries()) {
      const other = q.slots[s]!;
      expect(other.bases).toEqual(slot.bases);
      for (const [id, entry] of slot.adapters) expect(other.adapters.get(id)).toEqual(entry);
    }
  });
});
