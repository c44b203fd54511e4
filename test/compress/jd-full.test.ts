import { describe, expect, it } from 'vitest';
import { fitJdFull } from '../../src/compress/jd-full.js';
import { relativeErrorOfPart } from '../../src/compress/slot-errors.js';
import { buildSlotProblem, factoredNormSquared, type SlotEntry } from '../../src/compress/slot-problem.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import type { LoraModule } from '../../src/io/lora-types.js';
import { multiply, transpose } from '../../src/linalg/index.js';
import { denseDelta, denseReconstruction, frobenius, relativeDenseError } from './method-helpers.js';

const SLOT = { path: 'model.layers.0.self_attn.q_proj', inFeatures: 24, outFeatures: 20 };

function entriesOf(modules: LoraModule[]): SlotEntry[] {
  return modules.map((m, adapterIndex) => ({
    adapterIndex, rank: m.rank, scale: m.scale, a: m.a, b: m.b,
    normSquared: factoredNormSquared(m.a, m.b, m.rank, m.inFeatures, m.outFeatures, m.scale),
  }));
}

function modulesOf(set: ReturnType<typeof syntheticAdapterSet>): LoraModule[] {
  return set.map(({ adapter }) => adapter.modules.get(SLOT.path)!);
}

describe('JD-Full', () => {
  it('recovers a planted rank-R structure to relative error < 1e-4 at rank R', () => {
    const modules = modulesOf(syntheticAdapterSet({ slots: [SLOT], count: 6, rank: 4, sharedRank: 3, seed: 1, normSpread: 10 }));
    const problem = buildSlotProblem(entriesOf(modules), SLOT.inFeatures, SLOT.outFeatures, 'unit-norm');
    const fit = fitJdFull(problem, 3, { seed: 7 });
    expect(Math.max(...fit.errors)).toBeLessThan(1e-4);
    // and one rank less cannot do it
    expect(Math.max(...fitJdFull(problem, 2, { seed: 7 }).errors)).toBeGreaterThan(1e-2);
  });

  it('never lowers the objective from sweep to sweep', () => {
    // large enough that both updates take the Rayleigh–Ritz path, not the dense small-problem one
    const wide = { path: SLOT.path, inFeatures: 48, outFeatures: 64 };
    const modules = syntheticAdapterSet({ slots: [wide], count: 8, rank: 4, sharedRank: 0, seed: 2, normSpread: 4 })
      .map(({ adapter }) => adapter.modules.get(SLOT.path)!);
    const problem = buildSlotProblem(entriesOf(modules), wide.inFeatures, wide.outFeatures, 'none');
    const fit = fitJdFull(problem, 5, { seed: 3, tolerance: 0, maxSweeps: 12 });
    expect(fit.objectiveHistory.length).toBeGreaterThan(2);
    for (let k = 1; k < fit.objectiveHistory.length; k++) {
      expect(fit.objectiveHistory[k]!).toBeGreaterThanOrEqual(fit.objectiveHistory[k - 1]! * (1 - 1e-12));
    }
  });

  it('cores equal UᵀΔWV (dense) and factored errors equal dense errors', () => {
    const modules = modulesOf(syntheticAdapterSet({ slots: [SLOT], count: 5, rank: 3, sharedRank: 2, noise: 0.3, seed: 4, normSpread: 3 }));
    const problem = buildSlotProblem(entriesOf(modules), SLOT.inFeatures, SLOT.outFeatures, 'unit-norm');
    const rank = 3;
    const fit = fitJdFull(problem, rank, { seed: 5 });
    const { outFeatures: out, inFeatures: inF } = SLOT;
    // orthonormal bases
    const gramU = multiply(true, false, rank, rank, out, fit.u, fit.u);
    for (let i = 0; i < rank; i++) expect(gramU[i * rank + i]!).toBeCloseTo(1, 12);
    modules.forEach((module, i) => {
      const delta = denseDelta(module);
      const dense = multiply(true, false, rank, inF, out, fit.u, delta); // UᵀΔW: [R, in]
      const core = multiply(false, false, rank, rank, inF, dense, fit.v); // UᵀΔWV
      const weighted = fit.cores[i]!.map((value) => value * problem.unweight[i]!);
      for (let j = 0; j < core.length; j++) expect(weighted[j]!).toBeCloseTo(core[j]!, 10);
      const reconstruction = denseReconstruction(fit.u, transpose(fit.v, inF, rank), core, rank, out, inF, false);
      const denseError = relativeDenseError(delta, reconstruction);
      expect(fit.errors[i]!).toBeCloseTo(denseError, 8);
      const part = { u: Float32Array.from(fit.u), vt: Float32Array.from(transpose(fit.v, inF, rank)), rank, core: Float32Array.from(core), diagonal: false };
      expect(relativeErrorOfPart(module, part)).toBeCloseTo(denseError, 5);
      expect(frobenius(delta) ** 2).toBeCloseTo(factoredNormSquared(module.a, module.b, module.rank, inF, out, module.scale), 8);
    });
  });

  it('relativeErrorOfPart matches the dense error for arbitrary (non-orthonormal) parts, full and diagonal', () => {
    const module = modulesOf(syntheticAdapterSet({ slots: [SLOT], count: 1, rank: 3, sharedRank: 0, seed: 6 }))[0]!;
    const rank = 4;
    const random = syntheticAdapterSet({ slots: [{ ...SLOT, path: 'x.0.y' }], count: 2, rank, sharedRank: 0, seed: 8 });
    const u = random[0]!.adapter.modules.get('x.0.y')!.b; // [out, R]
    const vt = random[1]!.adapter.modules.get('x.0.y')!.a; // [R, in]
    const delta = denseDelta(module);
    for (const diagonal of [false, true]) {
      const core = Float32Array.from({ length: diagonal ? rank : rank * rank }, (_, j) => Math.sin(j + 1));
      const dense = relativeDenseError(delta, denseReconstruction(u, vt, core, rank, SLOT.outFeatures, SLOT.inFeatures, diagonal));
      expect(relativeErrorOfPart(module, { u, vt, rank, core, diagonal })).toBeCloseTo(dense, 6);
    }
  });
});
