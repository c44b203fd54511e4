/**
 * Solves S·x = b for a small symmetric positive semi-definite S [n, n] (several right-hand sides):
 * Cholesky when S is well conditioned, else the eigen pseudo-inverse (directions with eigenvalues
 * below 1e-12 · the largest are dropped), so a singular Gram matrix never yields NaN.
 */
import { symmetricEigen } from './symmetric-eigen.js';

/** x: [n, k] with S·x = b, b: [n, k]. */
export function solveSymmetric(s: Float64Array, b: Float64Array, n: number, k: number): Float64Array {
  const cholesky = choleskyFactor(s, n);
  const x = new Float64Array(n * k);
  if (cholesky) {
    for (let column = 0; column < k; column++) {
      const y = new Float64Array(n);
      for (let i = 0; i < n; i++) {
        let sum = b[i * k + column]!;
        for (let j = 0; j < i; j++) sum -= cholesky[i * n + j]! * y[j]!;
        y[i] = sum / cholesky[i * n + i]!;
      }
      for (let i = n - 1; i >= 0; i--) {
        let sum = y[i]!;
        for (let j = i + 1; j < n; j++) sum -= cholesky[j * n + i]! * x[j * k + column]!;
        x[i * k + column] = sum / cholesky[i * n + i]!;
      }
    }
    return x;
  }
  const { values, vectors } = symmetricEigen(s, n);
  const cutoff = 1e-12 * Math.max(values[0] ?? 0, 0);
  for (let e = 0; e < n; e++) {
    const lambda = values[e]!;
    if (!(lambda > cutoff)) continue;
    for (let column = 0; column < k; column++) {
      let projection = 0;
      for (let i = 0; i < n; i++) projection += vectors[i * n + e]! * b[i * k + column]!;
      projection /= lambda;
      for (let i = 0; i < n; i++) x[i * k + column]! += projection * vectors[i * n + e]!;
    }
  }
  return x;
}

/** Lower-triangular L with S = L·Lᵀ, or null when S is not comfortably positive definite. */
function choleskyFactor(s: Float64Array, n: number): Float64Array | null {
  let maxDiagonal = 0;
  for (let i = 0; i < n; i++) maxDiagonal = Math.max(maxDiagonal, s[i * n + i]!);
  if (!(maxDiagonal > 0)) return null;
  const l = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j <= i; j++) {
      let sum = 0.5 * (s[i * n + j]! + s[j * n + i]!);
      for (let p = 0; p < j; p++) sum -= l[i * n + p]! * l[j * n + p]!;
      if (i === j) {
        if (!(sum > 1e-10 * maxDiagonal)) return null;
        l[i * n + i] = Math.sqrt(sum);
      } else {
        l[i * n + j] = sum / l[j * n + j]!;
      }
    }
  }
  return l;
}
