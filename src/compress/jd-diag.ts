/**
 * JD-Diag for one slot: ΔW̃ᵢ ≈ U·diag(σᵢ)·Vᵀ with U [out, R], V [in, R] unconstrained and R numbers
 * per adapter. Alternating least squares, every step an exact minimiser (so the weighted error
 * never increases), all factored:
 *   σ step: (UᵀU ∘ VᵀV)·σᵢ = diag(UᵀΔW̃ᵢV)
 *   U step: U·Σᵢ((σᵢσᵢᵀ) ∘ VᵀV) = Σᵢ ΔW̃ᵢ·V·diag(σᵢ)
 *   V step: V·Σᵢ((σᵢσᵢᵀ) ∘ UᵀU) = Σᵢ ΔW̃ᵢᵀ·U·diag(σᵢ)
 * then columns of U and V are rescaled to unit norm with the scale moved into σ.
 * Started from the JD-Full solution rotated by the SVD of the mean core (so the start is as
 * diagonal as one rotation can make it). An atom uⱼvⱼᵀ whose σ is zero for every member would stay
 * dead under ALS (its normal equations are empty); it is re-seeded with the top singular pair of
 * the worst-fitted member's residual, which cannot raise the error (the σ step may keep it at 0).
 */
import { multiply, solveSymmetric, thinSvd } from '../linalg/index.js';
import { Random } from '../tensor/random.js';
import type { JdFitOptions, JdFullFit } from './jd-full.js';
import { DEFAULT_TOLERANCE } from './jd-full.js';
import { projectLeft, projectRight, type SlotProblem } from './slot-problem.js';

export interface JdDiagFit {
  readonly rank: number;
  /** U: [out, R], unit-norm columns */
  readonly u: Float64Array;
  /** V: [in, R], unit-norm columns */
  readonly v: Float64Array;
  /** Weighted σ̃ᵢ, [R] each (multiply by problem.unweight[i] for the adapter's own). */
  readonly cores: Float64Array[];
  readonly errors: Float64Array;
  /** Total weighted squared error Σᵢ‖ΔW̃ᵢ − U·diag(σ̃ᵢ)·Vᵀ‖² at the start and after each sweep. */
  readonly errorHistory: readonly number[];
  readonly sweeps: number;
}

export function fitJdDiag(problem: SlotProblem, full: JdFullFit, options: JdFitOptions): JdDiagFit {
  const rank = full.rank;
  const tolerance = options.tolerance ?? DEFAULT_TOLERANCE;
  const maxSweeps = options.maxSweeps ?? 100;
  const { outFeatures, inFeatures, count } = problem;
  // Rotate the JD-Full bases so the mean core is diagonal.
  const mean = new Float64Array(rank * rank);
  for (const core of full.cores) for (let j = 0; j < mean.length; j++) mean[j]! += core[j]! / count;
  const rotation = thinSvd(mean, rank, rank);
  let u = multiply(false, false, outFeatures, rank, rank, full.u, rotation.u);
  let v = multiply(false, false, inFeatures, rank, rank, full.v, rotation.v);
  const random = new Random(options.seed ^ 0x0d1a6);
  let state = sigmaStep(problem, u, v, rank);
  state = reviveAll(problem, u, v, state, rank, random);
  const history = [state.totalError];
  let sweeps = 0;
  while (sweeps < maxSweeps) {
    const previous = state.totalError;
    const before = { u, v, state };
    u = leastSquaresStep(problem, 'left', state.sigma, v, rank);
    v = leastSquaresStep(problem, 'right', state.sigma, u, rank);
    normaliseColumns(u, outFeatures, rank);
    normaliseColumns(v, inFeatures, rank);
    state = sigmaStep(problem, u, v, rank);
    state = reviveAll(problem, u, v, state, rank, random);
    // the error never increases: a sweep that raised it (a revive's re-seed can) is undone and ends the fit
    if (state.totalError > previous) {
      ({ u, v, state } = before);
      break;
    }
    sweeps++;
    history.push(state.totalError);
    const total = problem.normSquared.reduce((a, b) => a + b, 0);
    if ((previous - state.totalError) / Math.max(total, Number.MIN_VALUE) < tolerance) break;
  }
  const cores: Float64Array[] = [];
  for (let i = 0; i < count; i++) cores.push(state.sigma.slice(i * rank, (i + 1) * rank));
  const errors = new Float64Array(count);
  for (let i = 0; i < count; i++) errors[i] = Math.sqrt(Math.max(0, state.memberErrors[i]!) / problem.normSquared[i]!);
  return { rank, u, v, cores, errors, errorHistory: history, sweeps };
}

interface SigmaState {
  /** [count, R] */
  readonly sigma: Float64Array;
  readonly memberErrors: Float64Array;
  readonly totalError: number;
}

/** Hadamard product (XᵀX) ∘ (YᵀY) of the Gram matrices of two [·, R] matrices. */
export function gramHadamard(x: Float64Array, xRows: number, y: Float64Array, yRows: number, rank: number): Float64Array {
  const gx = multiply(true, false, rank, rank, xRows, x, x);
  const gy = multiply(true, false, rank, rank, yRows, y, y);
  for (let j = 0; j < gx.length; j++) gx[j]! *= gy[j]!;
  return gx;
}

/** Optimal σ̃ᵢ for fixed U, V, and each member's squared error. */
function sigmaStep(problem: SlotProblem, u: Float64Array, v: Float64Array, rank: number): SigmaState {
  const { count } = problem;
  const hadamard = gramHadamard(u, problem.outFeatures, v, problem.inFeatures, rank);
  const q = projectLeft(problem, u, rank);
  const p = projectRight(problem, v, rank);
  // rhs[R, count]: diag(UᵀΔW̃ᵢV)
  const rhs = new Float64Array(rank * count);
  for (let i = 0; i < count; i++) {
    const start = problem.offsets[i]!, end = start + problem.ranks[i]!;
    for (let t = start; t < end; t++) for (let j = 0; j < rank; j++) rhs[j * count + i]! += q[t * rank + j]! * p[t * rank + j]!;
  }
  const solution = solveSymmetric(hadamard, rhs, rank, count);
  const sigma = new Float64Array(count * rank);
  const memberErrors = new Float64Array(count);
  let totalError = 0;
  for (let i = 0; i < count; i++) {
    let cross = 0, quadratic = 0;
    for (let j = 0; j < rank; j++) {
      const value = solution[j * count + i]!;
      sigma[i * rank + j] = value;
      cross += value * rhs[j * count + i]!;
      for (let l = 0; l < rank; l++) quadratic += value * hadamard[j * rank + l]! * solution[l * count + i]!;
    }
    const error = Math.max(0, problem.normSquared[i]! - 2 * cross + quadratic);
    memberErrors[i] = error;
    totalError += error;
  }
  return { sigma, memberErrors, totalError };
}

/**
 * Least-squares update of U (side 'left', other = V) or V (side 'right', other = U):
 * X·Σᵢ((σᵢσᵢᵀ) ∘ OᵀO) = Σᵢ ΔW̃ᵢ(ᵀ)·O·diag(σᵢ).
 */
function leastSquaresStep(problem: SlotProblem, side: 'left' | 'right', sigma: Float64Array, other: Float64Array,
  rank: number): Float64Array {
  const otherRows = side === 'left' ? problem.inFeatures : problem.outFeatures;
  const dim = side === 'left' ? problem.outFeatures : problem.inFeatures;
  const gram = multiply(true, false, rank, rank, otherRows, other, other);
  const lhs = new Float64Array(rank * rank);
  for (let i = 0; i < problem.count; i++) {
    for (let j = 0; j < rank; j++) {
      const sj = sigma[i * rank + j]!;
      for (let l = 0; l < rank; l++) lhs[j * rank + l]! += sj * sigma[i * rank + l]! * gram[j * rank + l]!;
    }
  }
  // stacked [Σr, R]: (AᵢV)·diag(σᵢ) for U, (B̃ᵢᵀU)·diag(σᵢ) for V
  const stacked = side === 'left' ? projectRight(problem, other, rank) : projectLeft(problem, other, rank);
  for (let i = 0; i < problem.count; i++) {
    const start = problem.offsets[i]!, end = start + problem.ranks[i]!;
    for (let t = start; t < end; t++) for (let j = 0; j < rank; j++) stacked[t * rank + j]! *= sigma[i * rank + j]!;
  }
  const rhs = side === 'left'
    ? multiply(false, false, dim, rank, problem.totalRank, problem.bAll, stacked)
    : multiply(false, false, dim, rank, problem.totalRank, problem.aAllT, stacked);
  // X·lhs = rhs  ⇔  lhs·Xᵀ = rhsᵀ (lhs symmetric)
  const rhsTransposed = new Float64Array(rank * dim);
  for (let d = 0; d < dim; d++) for (let j = 0; j < rank; j++) rhsTransposed[j * dim + d] = rhs[d * rank + j]!;
  const solutionTransposed = solveSymmetric(lhs, rhsTransposed, rank, dim);
  const x = new Float64Array(dim * rank);
  for (let d = 0; d < dim; d++) for (let j = 0; j < rank; j++) x[d * rank + j] = solutionTransposed[j * dim + d]!;
  return x;
}

/** Scales each column of X [rows, R] to unit norm (zero columns stay zero). */
function normaliseColumns(x: Float64Array, rows: number, rank: number): void {
  for (let j = 0; j < rank; j++) {
    let sum = 0;
    for (let i = 0; i < rows; i++) sum += x[i * rank + j]! ** 2;
    if (sum === 0) continue;
    const inverse = 1 / Math.sqrt(sum);
    for (let i = 0; i < rows; i++) x[i * rank + j]! *= inverse;
  }
}

/** Revives dead atoms one at a time (each seeded from the residuals left after the previous one). */
function reviveAll(problem: SlotProblem, u: Float64Array, v: Float64Array, state: SigmaState, rank: number, random: Random): SigmaState {
  for (let attempt = 0; attempt < rank && reviveDeadAtom(problem, u, v, state, rank, random); attempt++) {
    state = sigmaStep(problem, u, v, rank);
  }
  return state;
}

/**
 * Re-seeds the first atom j with Σᵢσᵢⱼ² ≈ 0 (or a zero column in U or V): uⱼ, vⱼ ← top singular pair of the
 * residual ΔW̃ᵢ − U·diag(σ̃ᵢ)·Vᵀ of the member with the largest remaining error, found by power
 * iteration in factored form. Returns whether an atom changed.
 */
function reviveDeadAtom(problem: SlotProblem, u: Float64Array, v: Float64Array, state: SigmaState, rank: number,
  random: Random): boolean {
  const { outFeatures, inFeatures, count } = problem;
  // an atom's energy relative to each member's norm: one used only by an adapter 1e-6 the others' size is not
  // dead (in absolute energy it was, and its re-seed from another member's residual raised the error)
  const energy = new Float64Array(rank);
  for (let i = 0; i < count; i++) {
    const norm = problem.normSquared[i]!;
    if (norm > 0) for (let j = 0; j < rank; j++) energy[j]! += state.sigma[i * rank + j]! ** 2 / norm;
  }
  let maxEnergy = 0;
  for (const e of energy) maxEnergy = Math.max(maxEnergy, e);
  let member = 0;
  for (let i = 1; i < count; i++) {
    if (state.memberErrors[i]! / problem.normSquared[i]! > state.memberErrors[member]! / problem.normSquared[member]!) member = i;
  }
  for (let j = 0; j < rank; j++) {
    if (energy[j]! > 1e-12 * maxEnergy && maxEnergy > 0) continue;
    if (!(state.memberErrors[member]! > 1e-20 * problem.normSquared[member]!)) return false;
    const start = problem.offsets[member]!, r = problem.ranks[member]!;
    const sigma = state.sigma.subarray(member * rank, (member + 1) * rank);
    // residual R = B̃ᵢAᵢ − U·diag(σ)·Vᵀ; power iteration on RᵀR for the top right singular vector
    let x: Float64Array = random.fillNormal(new Float64Array(inFeatures));
    let y: Float64Array = new Float64Array(outFeatures);
    for (let iteration = 0; iteration < 30; iteration++) {
      y = residualApply(problem, u, v, sigma, rank, start, r, x);
      x = residualApplyTranspose(problem, u, v, sigma, rank, start, r, y);
      const norm = Math.sqrt(x.reduce((sum, value) => sum + value * value, 0));
      if (norm === 0) break;
      for (let k = 0; k < inFeatures; k++) x[k]! /= norm;
    }
    y = residualApply(problem, u, v, sigma, rank, start, r, x);
    const yNorm = Math.sqrt(y.reduce((sum, value) => sum + value * value, 0));
    if (!(yNorm > 0)) continue;
    for (let o = 0; o < outFeatures; o++) u[o * rank + j] = y[o]! / yNorm;
    for (let k = 0; k < inFeatures; k++) v[k * rank + j] = x[k]!;
    return true;
  }
  return false;
}

/** R·x for member i's residual (x: [in] → [out]). */
function residualApply(problem: SlotProblem, u: Float64Array, v: Float64Array, sigma: Float64Array, rank: number,
  start: number, r: number, x: Float64Array): Float64Array {
  const { outFeatures, inFeatures, totalRank } = problem;
  const ax = new Float64Array(r);
  for (let p = 0; p < r; p++) {
    let sum = 0;
    const row = (start + p) * inFeatures;
    for (let k = 0; k < inFeatures; k++) sum += problem.aAll[row + k]! * x[k]!;
    ax[p] = sum;
  }
  const vx = new Float64Array(rank);
  for (let k = 0; k < inFeatures; k++) for (let j = 0; j < rank; j++) vx[j]! += v[k * rank + j]! * x[k]!;
  const y = new Float64Array(outFeatures);
  for (let o = 0; o < outFeatures; o++) {
    let sum = 0;
    for (let p = 0; p < r; p++) sum += problem.bAll[o * totalRank + start + p]! * ax[p]!;
    for (let j = 0; j < rank; j++) sum -= u[o * rank + j]! * sigma[j]! * vx[j]!;
    y[o] = sum;
  }
  return y;
}

/** Rᵀ·y for member i's residual (y: [out] → [in]). */
function residualApplyTranspose(problem: SlotProblem, u: Float64Array, v: Float64Array, sigma: Float64Array, rank: number,
  start: number, r: number, y: Float64Array): Float64Array {
  const { outFeatures, inFeatures, totalRank } = problem;
  const by = new Float64Array(r);
  for (let o = 0; o < outFeatures; o++) for (let p = 0; p < r; p++) by[p]! += problem.bAll[o * totalRank + start + p]! * y[o]!;
  const uy = new Float64Array(rank);
  for (let o = 0; o < outFeatures; o++) for (let j = 0; j < rank; j++) uy[j]! += u[o * rank + j]! * y[o]!;
  const x = new Float64Array(inFeatures);
  for (let k = 0; k < inFeatures; k++) {
    let sum = 0;
    for (let p = 0; p < r; p++) sum += problem.aAll[(start + p) * inFeatures + k]! * by[p]!;
    for (let j = 0; j < rank; j++) sum -= v[k * rank + j]! * sigma[j]! * uy[j]!;
    x[k] = sum;
  }
  return x;
}
