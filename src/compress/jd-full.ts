/**
 * JD-Full for one slot: orthonormal U [out, R], V [in, R] shared, full cores Σᵢ = UᵀΔW̃ᵢV, maximising
 * Σᵢ‖UᵀΔW̃ᵢV‖² (Tucker-2 / HOOI on the stack of weighted deltas). Started from the HOSVD, then
 * alternating U and V updates; each update is a Rayleigh–Ritz step whose search space contains the
 * current basis, so the objective never decreases. All products are factored (slot-problem.ts).
 */
import { Random } from '../tensor/random.js';
import { topEigenvectorsPsd } from '../linalg/index.js';
import { applyGram, blockInnerProducts, hosvdFactor, projectLeft, projectRight, type SlotProblem } from './slot-problem.js';

export interface JdFitOptions {
  /** Relative-improvement tolerance (default 1e-6). */
  readonly tolerance?: number;
  /** Default 20 (jd-full) / 100 (jd-diag); see docs/compression.md "Stopping". */
  readonly maxSweeps?: number;
  readonly seed: number;
}

export interface JdFullFit {
  readonly rank: number;
  /** U: [out, R] orthonormal */
  readonly u: Float64Array;
  /** V: [in, R] orthonormal */
  readonly v: Float64Array;
  /** Weighted cores UᵀΔW̃ᵢV, [R, R] each (multiply by problem.unweight[i] for the adapter's own). */
  readonly cores: Float64Array[];
  /** Relative error per member, ‖ΔWᵢ − UΣᵢVᵀ‖/‖ΔWᵢ‖. */
  readonly errors: Float64Array;
  /** Σᵢ‖Σ̃ᵢ‖² after the HOSVD and after each sweep. */
  readonly objectiveHistory: readonly number[];
  readonly sweeps: number;
}

export const DEFAULT_TOLERANCE = 1e-6;
/** HOOI converges linearly and slowly on unrelated adapters; planted structure converges in 1–3 sweeps. */
export const DEFAULT_FULL_SWEEPS = 20;

export function fitJdFull(problem: SlotProblem, rank: number, options: JdFitOptions): JdFullFit {
  const random = new Random(options.seed);
  const tolerance = options.tolerance ?? DEFAULT_TOLERANCE;
  const maxSweeps = options.maxSweeps ?? DEFAULT_FULL_SWEEPS;
  const { outFeatures, inFeatures } = problem;
  // HOSVD: top-R eigenvectors of Σ ΔW̃ᵢΔW̃ᵢᵀ and of Σ ΔW̃ᵢᵀΔW̃ᵢ.
  const left = hosvdFactor(problem, 'left');
  let u = topEigenvectorsPsd((x, k) => applyGram(problem, 'left', left.y, left.width, x, k), outFeatures, rank,
    { random, powerIterations: 1 }).vectors;
  const right = hosvdFactor(problem, 'right');
  let v = topEigenvectorsPsd((x, k) => applyGram(problem, 'right', right.y, right.width, x, k), inFeatures, rank,
    { random, powerIterations: 1 }).vectors;
  let objective = objectiveOf(problem, u, v, rank);
  const history = [objective];
  let sweeps = 0;
  while (sweeps < maxSweeps) {
    // U ← top-R left singular vectors of [ΔW̃₁V | … ]: eigenvectors of Σ ΔW̃ᵢVVᵀΔW̃ᵢᵀ, Yᵢ = AᵢV.
    const p = projectRight(problem, v, rank);
    u = topEigenvectorsPsd((x, k) => applyGram(problem, 'left', p, rank, x, k), outFeatures, rank,
      { random, start: u, startWidth: rank, powerIterations: 1 }).vectors;
    // V likewise with U fixed, Yᵢ = B̃ᵢᵀU.
    const q = projectLeft(problem, u, rank);
    v = topEigenvectorsPsd((x, k) => applyGram(problem, 'right', q, rank, x, k), inFeatures, rank,
      { random, start: v, startWidth: rank, powerIterations: 1 }).vectors;
    sweeps++;
    const next = objectiveOf(problem, u, v, rank);
    history.push(next);
    const improvement = (next - objective) / Math.max(Math.abs(objective), Number.MIN_VALUE);
    objective = next;
    if (improvement < tolerance) break;
  }
  const cores = blockInnerProducts(problem, projectLeft(problem, u, rank), projectRight(problem, v, rank), rank);
  const errors = new Float64Array(problem.count);
  for (let i = 0; i < problem.count; i++) {
    let coreSquared = 0;
    for (const value of cores[i]!) coreSquared += value * value;
    const norm = problem.normSquared[i]!;
    errors[i] = Math.sqrt(Math.max(0, norm - coreSquared) / norm);
  }
  return { rank, u, v, cores, errors, objectiveHistory: history, sweeps };
}

/** Σᵢ‖UᵀΔW̃ᵢV‖²_F. */
export function objectiveOf(problem: SlotProblem, u: Float64Array, v: Float64Array, rank: number): number {
  const cores = blockInnerProducts(problem, projectLeft(problem, u, rank), projectRight(problem, v, rank), rank);
  let sum = 0;
  for (const core of cores) for (const value of core) sum += value * value;
  return sum;
}
