/**
 * One slot's fitting problem in factored form: the members' weighted deltas
 * ΔW̃ᵢ = √wᵢ·sᵢ·Bᵢ·Aᵢ kept as concatenated factors, never as dense [out, in] matrices.
 *   bAll: [out, Σrᵢ]  columns of √wᵢ·sᵢ·Bᵢ, member after member (and its transpose bAllT)
 *   aAll: [Σrᵢ, in]   rows of Aᵢ, member after member (and its transpose aAllT)
 * Both orientations are kept so every product is a plain (non-transposed) GEMM, the fast case.
 */
import { multiply, symmetricEigen, transpose } from '../linalg/index.js';

/** One adapter's module as the method sees it (f32 factors as loaded, scale separate). */
export interface SlotEntry {
  /** Index of the adapter in the compress input. */
  readonly adapterIndex: number;
  readonly rank: number;
  readonly scale: number;
  /** A: [rank, in] f32 */
  readonly a: Float32Array;
  /** B: [out, rank] f32, unscaled */
  readonly b: Float32Array;
  /** ‖sBA‖²_F */
  readonly normSquared: number;
}

export interface SlotProblem {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly count: number;
  readonly ranks: readonly number[];
  /** Row offset of member i in aAll (= column offset in bAll). */
  readonly offsets: readonly number[];
  readonly totalRank: number;
  readonly bAll: Float64Array;
  /** [Σr, out] */
  readonly bAllT: Float64Array;
  readonly aAll: Float64Array;
  /** [in, Σr] */
  readonly aAllT: Float64Array;
  /** ‖ΔW̃ᵢ‖² (weighted). */
  readonly normSquared: Float64Array;
  /** 1/√wᵢ: multiplies a weighted core back to the adapter's own scale. */
  readonly unweight: Float64Array;
}

export type Weighting = 'unit-norm' | 'none';

/** ‖s·B·A‖²_F = s²·trace((BᵀB)(AAᵀ)), from [r, r] Gram matrices. */
export function factoredNormSquared(a: ArrayLike<number>, b: ArrayLike<number>, rank: number, inFeatures: number,
  outFeatures: number, scale: number): number {
  const gramB = new Float64Array(rank * rank);
  const gramA = new Float64Array(rank * rank);
  for (let p = 0; p < rank; p++) {
    for (let q = p; q < rank; q++) {
      let sumB = 0;
      for (let o = 0; o < outFeatures; o++) sumB += b[o * rank + p]! * b[o * rank + q]!;
      let sumA = 0;
      const rowP = p * inFeatures, rowQ = q * inFeatures;
      for (let k = 0; k < inFeatures; k++) sumA += a[rowP + k]! * a[rowQ + k]!;
      gramB[p * rank + q] = gramB[q * rank + p] = sumB;
      gramA[p * rank + q] = gramA[q * rank + p] = sumA;
    }
  }
  let trace = 0;
  for (let p = 0; p < rank; p++) for (let q = 0; q < rank; q++) trace += gramB[p * rank + q]! * gramA[q * rank + p]!;
  return scale * scale * Math.max(trace, 0);
}

/** Builds the weighted, concatenated problem for the given entries (all with ‖ΔW‖ > 0). */
export function buildSlotProblem(entries: readonly SlotEntry[], inFeatures: number, outFeatures: number,
  weighting: Weighting): SlotProblem {
  const count = entries.length;
  const ranks = entries.map((e) => e.rank);
  const offsets: number[] = [];
  let totalRank = 0;
  for (const r of ranks) { offsets.push(totalRank); totalRank += r; }
  const bAllT = new Float64Array(totalRank * outFeatures);
  const aAll = new Float64Array(totalRank * inFeatures);
  const normSquared = new Float64Array(count);
  const unweight = new Float64Array(count);
  entries.forEach((entry, i) => {
    const weightRoot = weighting === 'unit-norm' ? 1 / Math.sqrt(entry.normSquared) : 1;
    unweight[i] = 1 / weightRoot;
    normSquared[i] = weighting === 'unit-norm' ? 1 : entry.normSquared;
    const factor = weightRoot * entry.scale;
    const offset = offsets[i]!;
    for (let p = 0; p < entry.rank; p++) {
      const row = (offset + p) * outFeatures;
      for (let o = 0; o < outFeatures; o++) bAllT[row + o] = factor * entry.b[o * entry.rank + p]!;
    }
    aAll.set(entry.a.subarray(0, entry.rank * inFeatures), offset * inFeatures);
  });
  const bAll = transpose(bAllT, totalRank, outFeatures);
  const aAllT = transpose(aAll, totalRank, inFeatures);
  return { inFeatures, outFeatures, count, ranks, offsets, totalRank, bAll, bAllT, aAll, aAllT, normSquared, unweight };
}

/** Q = ΔB̃ᵀ·U per member, stacked: [Σr, R] = bAllᵀ·U. */
export function projectLeft(problem: SlotProblem, u: Float64Array, rank: number): Float64Array {
  return multiply(false, false, problem.totalRank, rank, problem.outFeatures, problem.bAllT, u);
}

/** P = A·V per member, stacked: [Σr, R] = aAll·V. */
export function projectRight(problem: SlotProblem, v: Float64Array, rank: number): Float64Array {
  return multiply(false, false, problem.totalRank, rank, problem.inFeatures, problem.aAll, v);
}

/**
 * Per-member products of two stacked [Σr, R] matrices: out_i = Xᵢᵀ·Yᵢ ([R, R]), where Xᵢ, Yᵢ are
 * member i's row blocks. With X = bAllᵀU and Y = aAll·V this is the weighted core UᵀΔW̃ᵢV.
 */
export function blockInnerProducts(problem: SlotProblem, x: Float64Array, y: Float64Array, rank: number): Float64Array[] {
  const cores: Float64Array[] = [];
  for (let i = 0; i < problem.count; i++) {
    const core = new Float64Array(rank * rank);
    const start = problem.offsets[i]!, end = start + problem.ranks[i]!;
    for (let t = start; t < end; t++) {
      for (let p = 0; p < rank; p++) {
        const xValue = x[t * rank + p]!;
        if (xValue === 0) continue;
        for (let q = 0; q < rank; q++) core[p * rank + q]! += xValue * y[t * rank + q]!;
      }
    }
    cores.push(core);
  }
  return cores;
}

/**
 * G·X for G = Σᵢ Lᵢ·(YᵢYᵢᵀ)·Lᵢᵀ where L is bAll (side 'left': G: [out, out]) or aAllᵀ (side
 * 'right': G: [in, in]) and Y: [Σr, R] is stacked per member. X: [dim, k].
 */
export function applyGram(problem: SlotProblem, side: 'left' | 'right', y: Float64Array, rank: number,
  x: Float64Array, k: number): Float64Array {
  const dim = side === 'left' ? problem.outFeatures : problem.inFeatures;
  const total = problem.totalRank;
  // t = Lᵀ·X: [Σr, k]
  const t = side === 'left'
    ? multiply(false, false, total, k, dim, problem.bAllT, x)
    : multiply(false, false, total, k, dim, problem.aAll, x);
  // s_i = Y_i·(Y_iᵀ·t_i) per member block
  const s = new Float64Array(total * k);
  const inner = new Float64Array(rank * k);
  for (let i = 0; i < problem.count; i++) {
    const start = problem.offsets[i]!, end = start + problem.ranks[i]!;
    inner.fill(0);
    for (let row = start; row < end; row++) {
      for (let p = 0; p < rank; p++) {
        const yValue = y[row * rank + p]!;
        if (yValue === 0) continue;
        for (let c = 0; c < k; c++) inner[p * k + c]! += yValue * t[row * k + c]!;
      }
    }
    for (let row = start; row < end; row++) {
      for (let p = 0; p < rank; p++) {
        const yValue = y[row * rank + p]!;
        if (yValue === 0) continue;
        for (let c = 0; c < k; c++) s[row * k + c]! += yValue * inner[p * k + c]!;
      }
    }
  }
  return side === 'left'
    ? multiply(false, false, dim, k, total, problem.bAll, s)
    : multiply(false, false, dim, k, total, problem.aAllT, s);
}

/** The member Gram blocks for the initial (HOSVD) step: stacked Y with YᵢYᵢᵀ = AᵢAᵢᵀ (left) or B̃ᵢᵀB̃ᵢ (right). */
export function hosvdFactor(problem: SlotProblem, side: 'left' | 'right'): { y: Float64Array; width: number } {
  // Y_i is the symmetric square root of the member's [r, r] Gram (zero padded to the widest rank),
  // so applyGram with it applies Σ B̃ᵢAᵢAᵢᵀB̃ᵢᵀ (left) or Σ AᵢᵀB̃ᵢᵀB̃ᵢAᵢ (right) exactly.
  const width = Math.max(1, ...problem.ranks);
  const y = new Float64Array(problem.totalRank * width);
  for (let i = 0; i < problem.count; i++) {
    const r = problem.ranks[i]!, offset = problem.offsets[i]!;
    const gram = new Float64Array(r * r);
    for (let p = 0; p < r; p++) {
      for (let q = p; q < r; q++) {
        let sum = 0;
        if (side === 'left') {
          const rowP = (offset + p) * problem.inFeatures, rowQ = (offset + q) * problem.inFeatures;
          for (let k = 0; k < problem.inFeatures; k++) sum += problem.aAll[rowP + k]! * problem.aAll[rowQ + k]!;
        } else {
          const rowP = (offset + p) * problem.outFeatures, rowQ = (offset + q) * problem.outFeatures;
          for (let o = 0; o < problem.outFeatures; o++) sum += problem.bAllT[rowP + o]! * problem.bAllT[rowQ + o]!;
        }
        gram[p * r + q] = gram[q * r + p] = sum;
      }
    }
    const root = symmetricSquareRoot(gram, r);
    for (let p = 0; p < r; p++) for (let q = 0; q < r; q++) y[(offset + p) * width + q] = root[p * r + q]!;
  }
  return { y, width };
}

/** Y with Y·Yᵀ = gram: the Cholesky factor when it exists, else the symmetric square root. */
function symmetricSquareRoot(gram: Float64Array, r: number): Float64Array {
  const cholesky = new Float64Array(r * r);
  let maxDiagonal = 0;
  for (let i = 0; i < r; i++) maxDiagonal = Math.max(maxDiagonal, gram[i * r + i]!);
  let ok = maxDiagonal > 0;
  for (let i = 0; i < r && ok; i++) {
    for (let j = 0; j <= i; j++) {
      let sum = gram[i * r + j]!;
      for (let p = 0; p < j; p++) sum -= cholesky[i * r + p]! * cholesky[j * r + p]!;
      if (i === j) {
        if (!(sum > 1e-12 * maxDiagonal)) { ok = false; break; }
        cholesky[i * r + i] = Math.sqrt(sum);
      } else {
        cholesky[i * r + j] = sum / cholesky[j * r + j]!;
      }
    }
  }
  if (ok) return cholesky;
  const { values, vectors } = symmetricEigen(gram, r);
  const root = new Float64Array(r * r);
  for (let e = 0; e < r; e++) {
    const lambda = Math.sqrt(Math.max(values[e]!, 0));
    if (lambda === 0) continue;
    for (let p = 0; p < r; p++) for (let q = 0; q < r; q++) root[p * r + q]! += lambda * vectors[p * r + e]! * vectors[q * r + e]!;
  }
  return root;
}
