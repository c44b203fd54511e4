import { describe, expect, it } from 'vitest';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import type { AdapterSlotResult } from '../../src/compress/compression-types.js';
import { relativeErrorOfPart } from '../../src/compress/slot-errors.js';
import { syntheticAdapter, syntheticAdapterSet, syntheticModule } from '../../src/compress/synthetic-adapters.js';
import type { LoraAdapter, LoraModule } from '../../src/io/lora-types.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { denseDelta, denseReconstruction, relativeDenseError } from './method-helpers.js';

const Q = { path: 'model.layers.0.self_attn.q_proj', inFeatures: 20, outFeatures: 20 };
const V = { path: 'model.layers.0.self_attn.v_proj', inFeatures: 20, outFeatures: 10 };

function withModules(adapter: LoraAdapter, modules: LoraModule[], baseModel?: string | null): LoraAdapter {
  return syntheticAdapter(new Map(modules.map((m) => [m.path, m])), baseModel === undefined ? adapter.config.baseModelNameOrPath : baseModel, modules[0]!.rank);
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try { await promise; } catch (error) { return error; }
  throw new Error('expected a rejection');
}

describe('compressAdapters', () => {
  it('compresses a planted family within budget; stored parts reconstruct (dense check); deterministic', async () => {
    const inputs = syntheticAdapterSet({ slots: [Q, V], count: 6, rank: 4, sharedRank: 2, noise: 0.01, seed: 1, normSpread: 5 });
    const calls: [number, number, string][] = [];
    const options = { method: 'jd-full' as const, maxError: 0.05, seed: 9, onProgress: (d: number, t: number, l: string) => calls.push([d, t, l]) };
    const result = await compressAdapters(inputs, options);
    expect(calls.map((c) => c[0])).toEqual([1, 2]);
    expect(calls.every((c) => c[1] === 2)).toBe(true);
    expect(result.slots.map((s) => s.path)).toEqual([Q.path, V.path]);
    expect(result.options.weighting).toBe('unit-norm');
    for (const slot of result.slots) {
      const bases = slot.bases[0]!;
      expect(bases.rank).toBe(2);
      for (const [id, entry] of slot.adapters) {
        expect(entry.storage).toBe('compressed');
        if (entry.storage !== 'compressed') continue;
        expect(entry.relativeError).toBeLessThanOrEqual(0.05);
        const module = inputs.find((x) => x.id === id)!.adapter.modules.get(slot.path)!;
        const dense = relativeDenseError(denseDelta(module), denseReconstruction(bases.u, bases.vt, entry.core, bases.rank, slot.outFeatures, slot.inFeatures, false));
        expect(entry.relativeError).toBeCloseTo(dense, 5);
      }
    }
    const again = await compressAdapters(inputs, { ...options, onProgress: undefined });
    const core = (r: typeof result): Float32Array => (r.slots[0]!.adapters.get('adapter-3') as Extract<AdapterSlotResult, { storage: 'compressed' }>).core;
    expect([...core(again)]).toEqual([...core(result)]);
    expect(result.adapters.map((a) => a.rawParameters)).toEqual(Array(6).fill(4 * 40 + 4 * 30));
  });

  it('keeps independent adapters raw when compression does not pay (never larger than the originals)', async () => {
    const inputs = syntheticAdapterSet({ slots: [Q], count: 4, rank: 4, sharedRank: 0, seed: 2 });
    const result = await compressAdapters(inputs, { method: 'jd-full', maxError: 0.1, seed: 1 });
    const slot = result.slots[0]!;
    expect(slot.bases).toEqual([null]);
    for (const [id, entry] of slot.adapters) {
      // the search stops at the storage break-even rank; the budget is missed there
      expect(entry).toMatchObject({ storage: 'raw', reason: 'over-budget', relativeError: 0, rank: 4 });
      if (entry.storage !== 'raw') continue;
      const module = inputs.find((x) => x.id === id)!.adapter.modules.get(Q.path)!;
      expect(entry.b[5]).toBeCloseTo(module.b[5]! * module.scale, 6); // scale folded into B
      expect([...entry.a]).toEqual([...module.a]);
    }
  });

  it('keeps a slot raw without fitting when no rank can be stored more cheaply (cheaper-raw)', async () => {
    const inputs = syntheticAdapterSet({ slots: [Q, V], count: 1, rank: 1, sharedRank: 0, seed: 3 });
    const result = await compressAdapters(inputs, { method: 'jd-full', rank: 4, seed: 1 });
    for (const slot of result.slots) {
      expect(slot.bases).toEqual([null]);
      expect(slot.adapters.get('adapter-0')).toMatchObject({ storage: 'raw', reason: 'cheaper-raw' });
    }
  });

  it('keeps an outlier raw (over-budget) at the rank cap while the family compresses', async () => {
    const family = syntheticAdapterSet({ slots: [Q], count: 8, rank: 3, sharedRank: 2, seed: 3 });
    const outlier = syntheticAdapterSet({ slots: [Q], count: 1, rank: 3, sharedRank: 0, seed: 4, idPrefix: 'outlier-' });
    const result = await compressAdapters([...family, ...outlier], { method: 'jd-full', rank: 2, maxError: 0.05, seed: 1 });
    const slot = result.slots[0]!;
    expect(slot.bases[0]?.rank).toBe(2);
    expect(slot.adapters.get('outlier-0')).toMatchObject({ storage: 'raw', reason: 'over-budget' });
    for (const { id } of family) expect(slot.adapters.get(id)?.storage).toBe('compressed');
  });

  it('stores zero adapters as zero, flags them, and never divides by zero', async () => {
    const inputs = syntheticAdapterSet({ slots: [Q, V], count: 4, rank: 2, sharedRank: 2, seed: 5 });
    const zeroQ = syntheticModule(Q, 2, 2, 4, new Float32Array(2 * 20).fill(0.1), new Float32Array(20 * 2));
    const zeroV = syntheticModule(V, 2, 2, 4, new Float32Array(2 * 20).fill(0.1), new Float32Array(10 * 2));
    const partlyZero = withModules(inputs[0]!.adapter, [zeroQ, inputs[1]!.adapter.modules.get(V.path)!]);
    const allZero = withModules(inputs[0]!.adapter, [zeroQ, zeroV]);
    const result = await compressAdapters([...inputs, { id: 'partly', adapter: partlyZero }, { id: 'zero', adapter: allZero }],
      { method: 'jd-diag', maxError: 0.05, seed: 1, maxSweeps: 30 });
    expect(result.slots[0]!.adapters.get('zero')).toEqual({ storage: 'zero', relativeError: 0 });
    expect(result.slots[0]!.adapters.get('partly')).toEqual({ storage: 'zero', relativeError: 0 });
    expect(result.slots[1]!.adapters.get('partly')?.storage).toBe('compressed');
    expect(result.adapters.find((a) => a.id === 'zero')!.flags).toContain('all-zero');
    expect(result.adapters.find((a) => a.id === 'partly')!.flags).toContain('zero-modules');
    for (const slot of result.slots) for (const entry of slot.adapters.values()) expect(Number.isFinite(entry.relativeError)).toBe(true);
  });

  it('handles mixed ranks and different target sets (a slot is compressed among the adapters that have it)', async () => {
    const mixed = syntheticAdapterSet({ slots: [Q, V], count: 6, rank: [2, 4, 8], sharedRank: 3, seed: 6 });
    const onlyQ = syntheticAdapterSet({ slots: [Q], count: 2, rank: 4, sharedRank: 3, seed: 7, familySeed: 6 ^ 0x5eed, idPrefix: 'only-q-' });
    const result = await compressAdapters([...mixed, ...onlyQ], { method: 'jd-full', maxError: 0.01, seed: 1 });
    const [q, v] = result.slots;
    expect([...q!.adapters.keys()]).toEqual([...mixed.map((x) => x.id), 'only-q-0', 'only-q-1']);
    expect([...v!.adapters.keys()]).toEqual(mixed.map((x) => x.id));
    expect(q!.bases[0]?.rank).toBe(3);
    for (const entry of q!.adapters.values()) expect(entry.storage).toBe('compressed');
    // stored f32 parts agree with the reported errors
    const bases = q!.bases[0]!;
    const entry = q!.adapters.get('adapter-2') as Extract<AdapterSlotResult, { storage: 'compressed' }>;
    const module = mixed[2]!.adapter.modules.get(Q.path)!;
    expect(module.rank).toBe(8);
    expect(relativeErrorOfPart(module, { ...bases, core: entry.core, diagonal: false })).toBeCloseTo(entry.relativeError, 12);
  });

  it('refuses incompatible adapters by name, and bad options', async () => {
    const inputs = syntheticAdapterSet({ slots: [Q], count: 2, rank: 2, sharedRank: 0, seed: 8 });
    const wrongShape = syntheticAdapterSet({ slots: [{ ...Q, inFeatures: 12 }], count: 1, rank: 2, sharedRank: 0, seed: 9, idPrefix: 'wide-' });
    const shapeError = await rejection(compressAdapters([...inputs, ...wrongShape], { method: 'jd-full', rank: 2 }));
    expect(isSoppuError(shapeError, 'ADAPTER_INCOMPATIBLE')).toBe(true);
    expect(String((shapeError as Error).message)).toMatch(/"adapter-0" and "wide-0".*q_proj/);
    const otherBase = { id: 'other', adapter: withModules(inputs[0]!.adapter, [...inputs[0]!.adapter.modules.values()], 'other/base') };
    const baseError = await rejection(compressAdapters([...inputs, otherBase], { method: 'jd-full', rank: 2 }));
    expect(isSoppuError(baseError, 'ADAPTER_INCOMPATIBLE')).toBe(true);
    expect(String((baseError as Error).message)).toMatch(/"adapter-0" and "other".*pass --ignore-base-model/);
    // the caller may vouch that the names are one model (a folder and a hub id)
    await expect(compressAdapters([...inputs, otherBase], { method: 'jd-full', rank: 2 }, { ignoreBaseModel: true })).resolves.toBeDefined();
    const unknownBase = { id: 'unknown', adapter: withModules(inputs[0]!.adapter, [...inputs[0]!.adapter.modules.values()], null) };
    await expect(compressAdapters([...inputs, unknownBase], { method: 'jd-full', rank: 2 })).resolves.toBeDefined();
    for (const bad of [{ rank: 0 }, { maxError: 0 }, { maxError: 1.5 }, { clusters: 3 }, { maxSweeps: 0 }]) {
      expect(isSoppuError(await rejection(compressAdapters(inputs, { method: 'jd-full', ...bad })), 'CONFIG')).toBe(true);
    }
    expect(isSoppuError(await rejection(compressAdapters([inputs[0]!, inputs[0]!], { method: 'jd-full', rank: 2 })), 'CONFIG')).toBe(true);
    const nan = inputs[1]!.adapter.modules.get(Q.path)!;
    const broken = { id: 'nan', adapter: withModules(inputs[1]!.adapter, [{ ...nan, a: nan.a.map((x, i) => (i === 3 ? Number.NaN : x)) }]) };
    const nanError = await rejection(compressAdapters([inputs[0]!, broken], { method: 'jd-full', rank: 2 }));
    expect(isSoppuError(nanError, 'ADAPTER_TENSORS')).toBe(true);
    expect(String((nanError as Error).message)).toMatch(/"nan".*q_proj/);
  });
});

describe('members that miss the budget at the cap', () => {
  it('are stored raw, and the rest fitted again without them (a few unrelated adapters no longer send a whole slot raw)', async () => {
    const slots = [{ path: 'model.layers.0.self_attn.q_proj', inFeatures: 40, outFeatures: 40 }];
    const family = syntheticAdapterSet({ slots, count: 20, rank: 4, seed: 1, sharedRank: 2, noise: 0, idPrefix: 'fam' });
    const outliers = syntheticAdapterSet({ slots, count: 4, rank: 8, seed: 2, sharedRank: 0, idPrefix: 'out' });
    const result = await compressAdapters([...family, ...outliers], { method: 'jd-full', maxError: 0.1 });
    const slot = result.slots[0]!;
    expect(slot.bases.map((b) => b?.rank ?? null)).toEqual([2]);
    for (const { id } of family) expect(slot.adapters.get(id)).toMatchObject({ storage: 'compressed' });
    for (const { id } of family) expect(slot.adapters.get(id)!.relativeError).toBeLessThanOrEqual(0.1);
    for (const { id } of outliers) expect(slot.adapters.get(id)).toMatchObject({ storage: 'raw', reason: 'over-budget' });
  });
});
