import { describe, expect, it } from 'vitest';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import { deriveSeed, fitSlot } from '../../src/compress/fit-slot.js';
import { selectRank } from '../../src/compress/select-rank.js';
import { buildSlotProblem, factoredNormSquared } from '../../src/compress/slot-problem.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { Random } from '../../src/tensor/random.js';

const SLOT = { path: 'model.layers.0.self_attn.v_proj', inFeatures: 30, outFeatures: 26 };

describe('rank under an error budget', () => {
  for (const method of ['jd-full', 'jd-diag'] as const) {
    it(`${method}: picks the smallest rank whose fit meets the budget (R − 1 fails)`, () => {
      const modules = syntheticAdapterSet({ slots: [SLOT], count: 8, rank: 4, sharedRank: 5, noise: 0.05, seed: 3, normSpread: 2 })
        .map(({ adapter }) => adapter.modules.get(SLOT.path)!);
      const entries = modules.map((m, adapterIndex) => ({
        adapterIndex, rank: m.rank, scale: m.scale, a: m.a, b: m.b,
        normSquared: factoredNormSquared(m.a, m.b, m.rank, m.inFeatures, m.outFeatures, m.scale),
      }));
      const problem = buildSlotProblem(entries, SLOT.inFeatures, SLOT.outFeatures, 'unit-norm');
      const budget = 0.2;
      const options = { seed: 11, label: 'slot', maxSweeps: method === 'jd-diag' ? 40 : 50 };
      const selection = selectRank(problem, method, budget, 26, options);
      const rank = selection.fit.rank;
      expect(selection.withinBudget).toBe(true);
      expect(rank).toBeGreaterThan(1);
      expect(Math.max(...selection.fit.errors)).toBeLessThanOrEqual(budget);
      const below = fitSlot(problem, method, rank - 1, { ...options, seed: deriveSeed(options.seed, options.label, rank - 1) });
      expect(Math.max(...below.errors)).toBeGreaterThan(budget);
      const point = selection.errorByRank.find((p) => p.rank === rank - 1);
      expect(point?.maxError).toBeGreaterThan(budget);
      expect(selection.errorByRank.map((p) => p.rank)).toEqual([...selection.errorByRank.map((p) => p.rank)].sort((x, y) => x - y));
    });
  }

  it('keeps the start-only fit at the cap when it meets every budget and the full fit misses one (sweeps raise the total, not each member)', () => {
    const rng = new Random(5002);
    const [inFeatures, outFeatures, rank] = [20, 22, 4];
    const entries = Array.from({ length: 5 }, (_, adapterIndex) => {
      const a = Float32Array.from({ length: rank * inFeatures }, () => rng.normal());
      const b = Float32Array.from({ length: outFeatures * rank }, () => rng.normal());
      return { adapterIndex, rank, scale: 1, a, b, normSquared: factoredNormSquared(a, b, rank, inFeatures, outFeatures, 1) };
    });
    const problem = buildSlotProblem(entries, inFeatures, outFeatures, 'unit-norm');
    const options = { seed: 0, label: 'm.q/cluster-0', maxSweeps: 20, tolerance: 1e-6 };
    const budget = 0.5683;
    const quick = fitSlot(problem, 'jd-full', 9, { ...options, maxSweeps: 0, seed: deriveSeed(0, options.label, 9) });
    const full = fitSlot(problem, 'jd-full', 9, { ...options, seed: deriveSeed(0, options.label, 9) });
    expect(Math.max(...quick.errors)).toBeLessThanOrEqual(budget); // the case: the start meets every budget ...
    expect(Math.max(...full.errors)).toBeGreaterThan(budget); // ... and the swept fit misses one
    const selection = selectRank(problem, 'jd-full', budget, 9, options);
    expect(selection.withinBudget).toBe(true);
    expect(Math.max(...selection.fit.errors)).toBeLessThanOrEqual(budget);
  });

  it('compressAdapters stores the searched rank and the error-vs-rank curve', async () => {
    const inputs = syntheticAdapterSet({ slots: [SLOT], count: 10, rank: 4, sharedRank: 3, noise: 0.02, seed: 5 });
    const result = await compressAdapters(inputs, { method: 'jd-full', maxError: 0.1, seed: 1 });
    const slot = result.slots[0]!;
    expect(slot.bases[0]?.rank).toBe(3);
    expect(slot.errorByRank?.some((p) => p.rank === 2 && p.maxError > 0.1)).toBe(true);
    for (const entry of slot.adapters.values()) {
      expect(entry.storage).toBe('compressed');
      expect(entry.relativeError).toBeLessThanOrEqual(0.1);
    }
  });
});
