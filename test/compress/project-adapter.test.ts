import { describe, expect, it } from 'vitest';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import type { CompressionResult } from '../../src/compress/compression-types.js';
import { projectAdapter, type BankSlotBases } from '../../src/compress/project-adapter.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';

const Q = { path: 'model.layers.0.self_attn.q_proj', inFeatures: 24, outFeatures: 24 };
const V = { path: 'model.layers.0.self_attn.v_proj', inFeatures: 24, outFeatures: 12 };
const O = { path: 'model.layers.0.self_attn.o_proj', inFeatures: 24, outFeatures: 24 };

function bankSlots(result: CompressionResult): Map<string, BankSlotBases> {
  return new Map(result.slots.map((s) => [s.path, { method: s.method, inFeatures: s.inFeatures, outFeatures: s.outFeatures, bases: s.bases }]));
}

describe('projectAdapter', () => {
  for (const method of ['jd-full', 'jd-diag'] as const) {
    it(`${method}: a new member of the family fits within budget; an unrelated adapter falls back to raw`, async () => {
      const family = syntheticAdapterSet({ slots: [Q, V], count: 8, rank: 3, sharedRank: 2, seed: 1, familySeed: 42 });
      // planted cores are general 2×2 matrices: JD-Full needs R = 2, JD-Diag R = 4 (four rank-one atoms)
      const result = await compressAdapters(family, { method, rank: method === 'jd-full' ? 2 : 4, maxError: 0.05, seed: 1, maxSweeps: 200, tolerance: 1e-10 });
      for (const slot of result.slots) for (const entry of slot.adapters.values()) expect(entry.storage).toBe('compressed');
      const slots = bankSlots(result);
      const newcomer = syntheticAdapterSet({ slots: [Q, V, O], count: 1, rank: 4, sharedRank: 2, seed: 99, familySeed: 42 })[0]!;
      const projection = projectAdapter(newcomer.adapter, slots, { maxError: 0.05 });
      expect(projection.cluster).toBe(0);
      expect(projection.slots.get(Q.path)?.storage).toBe('compressed');
      expect(projection.slots.get(V.path)?.storage).toBe('compressed');
      expect(projection.maxError).toBeLessThanOrEqual(0.05);
      // the bank has no o_proj slot: raw
      expect(projection.slots.get(O.path)).toMatchObject({ storage: 'raw', reason: 'projection-over-budget' });
      const stranger = syntheticAdapterSet({ slots: [Q, V], count: 1, rank: 3, sharedRank: 0, seed: 5, idPrefix: 'x-' })[0]!;
      const strangerProjection = projectAdapter(stranger.adapter, slots, { maxError: 0.05 });
      for (const entry of strangerProjection.slots.values()) expect(entry).toMatchObject({ storage: 'raw', reason: 'projection-over-budget' });
    });
  }

  it('picks the cluster of its family and refuses a shape mismatch', async () => {
    const first = syntheticAdapterSet({ slots: [Q], count: 4, rank: 3, sharedRank: 2, seed: 1, familySeed: 7, idPrefix: 'a-' });
    const second = syntheticAdapterSet({ slots: [Q], count: 4, rank: 3, sharedRank: 2, seed: 2, familySeed: 8, idPrefix: 'b-' });
    const result = await compressAdapters([...first, ...second], { method: 'jd-full', clusters: 2, rank: 2, seed: 3 });
    const clusterOfSecond = result.adapters.find((a) => a.id === 'b-0')!.cluster;
    const newcomer = syntheticAdapterSet({ slots: [Q], count: 1, rank: 3, sharedRank: 2, seed: 77, familySeed: 8 })[0]!;
    const projection = projectAdapter(newcomer.adapter, bankSlots(result), {});
    expect(projection.cluster).toBe(clusterOfSecond);
    expect(projection.maxError).toBeLessThan(1e-4);
    const wrong = syntheticAdapterSet({ slots: [{ ...Q, outFeatures: 8 }], count: 1, rank: 3, sharedRank: 0, seed: 3 })[0]!;
    let error: unknown;
    try { projectAdapter(wrong.adapter, bankSlots(result), {}); } catch (e) { error = e; }
    expect(isSoppuError(error, 'ADAPTER_INCOMPATIBLE')).toBe(true);
    expect(String((error as Error).message)).toMatch(/q_proj.*\[out 8, in 24\].*\[out 24, in 24\]/);
  });
});
