/**
 * Householder QR of a tall matrix, thin form: A [m, n] = Q [m, n] · R [n, n], m ≥ n.
 * Q has orthonormal columns even when A is rank deficient (a zero column gets the identity
 * reflector), which is what the subspace iterations rely on.
 */
import { SoppuError } from '../errors/soppu-error.js';
import { multiply } from './dense.js';

export interface QrResult {
  /** Q: [m, n], orthonormal columns. */
  readonly q: Float64Array;
  /** R: [n, n], upper triangular. */
  readonly r: Float64Array;
}

export function householderQr(a: Float64Array, m: number, n: number): QrResult {
  if (m < n) throw new SoppuError('LINALG', `householderQr needs a tall matrix, got [${m}, ${n}]`, { limit: 'rows ≥ columns' });
  if (a.length < m * n) throw new SoppuError('LINALG', `householderQr: array holds ${a.length} values, [${m}, ${n}] needs ${m * n}`);
  // Work column-major: column j is work[j·m … j·m + m), contiguous for the reflector loops.
  const work = new Float64Array(m * n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) work[j * m + i] = a[i * n + j]!;
  const reflectors = new Float64Array(m * n); // v_j stored in column j, rows j…m−1, unit norm
  const active = new Uint8Array(n);
  for (let j = 0; j < n; j++) {
    const column = j * m;
    let norm = 0;
    for (let i = j; i < m; i++) norm += work[column + i]! ** 2;
    norm = Math.sqrt(norm);
    if (norm === 0) continue; // identity reflector: column already zero below the diagonal
    const alpha = work[column + j]! >= 0 ? -norm : norm;
    // v = x − alpha·e_j, normalised
    let vNorm = 0;
    for (let i = j; i < m; i++) {
      const value = i === j ? work[column + i]! - alpha : work[column + i]!;
      reflectors[column + i] = value;
      vNorm += value * value;
    }
    vNorm = Math.sqrt(vNorm);
    if (vNorm === 0) continue;
    for (let i = j; i < m; i++) reflectors[column + i]! /= vNorm;
    active[j] = 1;
    // apply H = I − 2vvᵀ to columns j…n−1
    for (let c = j; c < n; c++) {
      const target = c * m;
      let projection = 0;
      for (let i = j; i < m; i++) projection += reflectors[column + i]! * work[target + i]!;
      projection *= 2;
      for (let i = j; i < m; i++) work[target + i]! -= projection * reflectors[column + i]!;
    }
  }
  const r = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = i; j < n; j++) r[i * n + j] = work[j * m + i]!;
  // Q = H_0 · H_1 ⋯ H_{n−1} · I[:, :n], built column-major then transposed to row-major.
  const qColumns = new Float64Array(m * n);
  for (let j = 0; j < n; j++) qColumns[j * m + j] = 1;
  for (let k = n - 1; k >= 0; k--) {
    if (!active[k]) continue;
    const column = k * m;
    for (let c = k; c < n; c++) {
      const target = c * m;
      let projection = 0;
      for (let i = k; i < m; i++) projection += reflectors[column + i]! * qColumns[target + i]!;
      if (projection === 0) continue;
      projection *= 2;
      for (let i = k; i < m; i++) qColumns[target + i]! -= projection * reflectors[column + i]!;
    }
  }
  const q = new Float64Array(m * n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) q[i * n + j] = qColumns[j * m + i]!;
  return { q, r };
}

/**
 * An orthonormal basis [m, n] of the column space of A [m, n] (a thin Q). Tries Cholesky-QR twice
 * (two GEMMs per pass, so it runs at GEMM speed), which is accurate when A is well conditioned;
 * falls back to Householder when a pivot shows A is nearly rank deficient (κ beyond ~1e5) or the
 * second pass is not orthonormal to 1e-10.
 */
export function orthonormalColumns(a: Float64Array, m: number, n: number): Float64Array {
  if (m < n) throw new SoppuError('LINALG', `orthonormalColumns needs a tall matrix, got [${m}, ${n}]`, { limit: 'rows ≥ columns' });
  const once = choleskyQrPass(a, m, n);
  const twice = once && choleskyQrPass(once, m, n);
  if (twice && isOrthonormal(twice, m, n, 1e-10)) return twice;
  return householderQr(a, m, n).q;
}

/** A·R⁻¹ with AᵀA = RᵀR, or null when a Cholesky pivot is below 1e-10 of the largest (κ(A) > ~1e5). */
function choleskyQrPass(a: Float64Array, m: number, n: number): Float64Array | null {
  const gram = multiply(true, false, n, n, m, a, a);
  let maxDiagonal = 0;
  for (let i = 0; i < n; i++) maxDiagonal = Math.max(maxDiagonal, gram[i * n + i]!);
  if (!(maxDiagonal > 0) || !Number.isFinite(maxDiagonal)) return null;
  // upper-triangular R with gram = RᵀR
  const r = new Float64Array(n * n);
  for (let j = 0; j < n; j++) {
    for (let i = 0; i <= j; i++) {
      let sum = gram[i * n + j]!;
      for (let p = 0; p < i; p++) sum -= r[p * n + i]! * r[p * n + j]!;
      if (i === j) {
        if (!(sum > 1e-10 * maxDiagonal)) return null;
        r[j * n + j] = Math.sqrt(sum);
      } else {
        r[i * n + j] = sum / r[i * n + i]!;
      }
    }
  }
  // R⁻¹ (upper triangular), then Q = A·R⁻¹ by GEMM
  const inverse = new Float64Array(n * n);
  for (let j = 0; j < n; j++) {
    inverse[j * n + j] = 1 / r[j * n + j]!;
    for (let i = j - 1; i >= 0; i--) {
      let sum = 0;
      for (let p = i + 1; p <= j; p++) sum += r[i * n + p]! * inverse[p * n + j]!;
      inverse[i * n + j] = -sum / r[i * n + i]!;
    }
  }
  return multiply(false, false, m, n, n, a, inverse);
}

function isOrthonormal(q: Float64Array, m: number, n: number, tolerance: number): boolean {
  const gram = multiply(true, false, n, n, m, q, q);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
    if (!(Math.abs(gram[i * n + j]! - (i === j ? 1 : 0)) <= tolerance)) return false;
  }
  return true;
}
