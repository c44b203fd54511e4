import { describe, expect, it } from 'vitest';
import { fitJdDiag } from '../../src/compress/jd-diag.js';
import { fitJdFull } from '../../src/compress/jd-full.js';
import { bestCoreOnBases } from '../../src/compress/slot-errors.js';
import { buildSlotProblem, factoredNormSquared, type SlotEntry } from '../../src/compress/slot-problem.js';
import { syntheticAdapterSet, syntheticModule } from '../../src/compress/synthetic-adapters.js';
import type { LoraModule } from '../../src/io/lora-types.js';
import { orthonormalColumns, solveSymmetric, transpose } from '../../src/linalg/index.js';
import { Random } from '../../src/tensor/random.js';
import { denseDelta, denseReconstruction, relativeDenseError } from './method-helpers.js';

const SLOT = { path: 'model.layers.1.mlp.up_proj', inFeatures: 18, outFeatures: 22 };

function entriesOf(modules: LoraModule[]): SlotEntry[] {
  return modules.map((m, adapterIndex) => ({
    adapterIndex, rank: m.rank, scale: m.scale, a: m.a, b: m.b,
    normSquared: factoredNormSquared(m.a, m.b, m.rank, m.inFeatures, m.outFeatures, m.scale),
  }));
}

/** Dense least-squares σ minimising ‖ΔW − U·diag(σ)·Vᵀ‖ (normal equations over vec(uⱼvⱼᵀ)). */
function denseSigma(delta: Float64Array, u: Float64Array, v: Float64Array, rank: number, out: number, inF: number): Float64Array {
  const atoms = Array.from({ length: rank }, (_, j) => {
    const atom = new Float64Array(out * inF);
    for (let o = 0; o < out; o++) for (let i = 0; i < inF; i++) atom[o * inF + i] = u[o * rank + j]! * v[i * rank + j]!;
    return atom;
  });
  const normal = new Float64Array(rank * rank);
  const rhs = new Float64Array(rank);
  for (let j = 0; j < rank; j++) {
    for (let l = 0; l < rank; l++) normal[j * rank + l] = atoms[j]!.reduce((s, x, t) => s + x * atoms[l]![t]!, 0);
    rhs[j] = atoms[j]!.reduce((s, x, t) => s + x * delta[t]!, 0);
  }
  return solveSymmetric(normal, rhs, rank, 1);
}

describe('JD-Diag', () => {
  it('lowers the error from its JD-Full start, monotonically', () => {
    const modules = syntheticAdapterSet({ slots: [SLOT], count: 7, rank: 3, sharedRank: 4, noise: 0.2, seed: 1, normSpread: 3 })
      .map(({ adapter }) => adapter.modules.get(SLOT.path)!);
    const problem = buildSlotProblem(entriesOf(modules), SLOT.inFeatures, SLOT.outFeatures, 'unit-norm');
    const full = fitJdFull(problem, 4, { seed: 2 });
    const diag = fitJdDiag(problem, full, { seed: 2, tolerance: 0, maxSweeps: 30 });
    const history = diag.errorHistory;
    expect(history[history.length - 1]!).toBeLessThan(0.9 * history[0]!);
    for (let k = 1; k < history.length; k++) expect(history[k]!).toBeLessThanOrEqual(history[k - 1]! * (1 + 1e-12) + 1e-15);
  });

  it('keeps an atom that only an adapter 1e-6 the others\' size uses (weighting none), and never raises the error', () => {
    const random = new Random(21);
    const [inFeatures, outFeatures, rank] = [40, 30, 4];
    const u = orthonormalColumns(random.fillNormal(new Float64Array(outFeatures * rank), 1), outFeatures, rank);
    const v = orthonormalColumns(random.fillNormal(new Float64Array(inFeatures * rank), 1), inFeatures, rank);
    const sigmas = [[1, 0.8, 0.6, 0], [0.7, 1.2, 0.5, 0], [0.9, 0.4, 1.1, 0], [0, 0, 0, 1e-6]];
    const entries = sigmas.map((sigma, adapterIndex) => {
      const b = new Float32Array(outFeatures * rank), a = new Float32Array(rank * inFeatures);
      for (let o = 0; o < outFeatures; o++) for (let j = 0; j < rank; j++) b[o * rank + j] = u[o * rank + j]! * sigma[j]!;
      for (let j = 0; j < rank; j++) for (let k = 0; k < inFeatures; k++) a[j * inFeatures + k] = v[k * rank + j]!;
      return { adapterIndex, rank, scale: 1, a, b, normSquared: factoredNormSquared(a, b, rank, inFeatures, outFeatures, 1) };
    });
    const problem = buildSlotProblem(entries, inFeatures, outFeatures, 'none');
    const fit = fitJdDiag(problem, fitJdFull(problem, rank, { seed: 3 }), { seed: 3, maxSweeps: 100 });
    // exactly representable at rank 4: the small adapter's atom was re-seeded away (its error went to 1.0)
    expect(Math.max(...fit.errors)).toBeLessThan(1e-3);
    for (let k = 1; k < fit.errorHistory.length; k++) expect(fit.errorHistory[k]!).toBeLessThanOrEqual(fit.errorHistory[k - 1]!);
    // with tolerance 0 sweeps run until one would raise the error: that one is undone and not counted
    for (const seed of [1, 2, 3, 4, 5]) {
      const set = syntheticAdapterSet({ slots: [{ path: 'm.q', inFeatures: 24, outFeatures: 20 }], count: 6, rank: 4, sharedRank: 3, seed });
      const modules = set.map(({ adapter }) => adapter.modules.get('m.q')!);
      const slotProblem = buildSlotProblem(entriesOf(modules), 24, 20, 'unit-norm');
      const swept = fitJdDiag(slotProblem, fitJdFull(slotProblem, 3, { seed }), { seed, maxSweeps: 200, tolerance: 0 });
      expect(swept.errorHistory.length, `seed ${seed}`).toBe(swept.sweeps + 1);
      for (let k = 1; k < swept.errorHistory.length; k++) expect(swept.errorHistory[k]!, `seed ${seed}`).toBeLessThanOrEqual(swept.errorHistory[k - 1]!);
    }
  });

  it('recovers a planted diagonal structure ΔWᵢ = U·diag(σᵢ)·Vᵀ', () => {
    const rank = 3;
    const random = new Random(4);
    const u = random.fillNormal(new Float32Array(SLOT.outFeatures * rank));
    const vt = random.fillNormal(new Float32Array(rank * SLOT.inFeatures));
    const modules = Array.from({ length: 6 }, () => {
      const sigma = Array.from({ length: rank }, () => 0.5 + random.next());
      const b = new Float32Array(SLOT.outFeatures * rank);
      for (let o = 0; o < SLOT.outFeatures; o++) for (let j = 0; j < rank; j++) b[o * rank + j] = u[o * rank + j]! * sigma[j]!;
      return syntheticModule(SLOT, rank, 1, rank, vt.slice(), b);
    });
    const problem = buildSlotProblem(entriesOf(modules), SLOT.inFeatures, SLOT.outFeatures, 'unit-norm');
    const diag = fitJdDiag(problem, fitJdFull(problem, rank, { seed: 5 }), { seed: 5, tolerance: 1e-14, maxSweeps: 300 });
    expect(Math.max(...diag.errors)).toBeLessThan(1e-4);
  });

  it('σ solve matches a dense least-squares solve, and factored errors match dense ones', () => {
    const modules = syntheticAdapterSet({ slots: [SLOT], count: 4, rank: 2, sharedRank: 3, noise: 0.5, seed: 6 })
      .map(({ adapter }) => adapter.modules.get(SLOT.path)!);
    const problem = buildSlotProblem(entriesOf(modules), SLOT.inFeatures, SLOT.outFeatures, 'none');
    const rank = 3;
    const diag = fitJdDiag(problem, fitJdFull(problem, rank, { seed: 7 }), { seed: 7, maxSweeps: 5 });
    const { outFeatures: out, inFeatures: inF } = SLOT;
    modules.forEach((module, i) => {
      const delta = denseDelta(module);
      const expected = denseSigma(delta, diag.u, diag.v, rank, out, inF);
      for (let j = 0; j < rank; j++) expect(diag.cores[i]![j]!).toBeCloseTo(expected[j]!, 8);
      const projected = bestCoreOnBases(module, diag.u, diag.v, rank, true, problem.normSquared[i]!);
      for (let j = 0; j < rank; j++) expect(projected.core[j]!).toBeCloseTo(expected[j]!, 8);
      const dense = relativeDenseError(delta, denseReconstruction(diag.u, transpose(diag.v, inF, rank), expected, rank, out, inF, true));
      expect(diag.errors[i]!).toBeCloseTo(dense, 7);
      expect(projected.relativeError).toBeCloseTo(dense, 7);
    });
  });
});
