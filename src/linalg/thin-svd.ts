/**
 * Thin SVD of a tall matrix A [m, n] (m ≥ n): Householder QR, then one-sided Jacobi on the small R.
 * A = U · diag(S) · Vᵀ with U [m, n], S [n] descending, V [n, n].
 */
import { SoppuError } from '../errors/soppu-error.js';
import { multiply } from './dense.js';
import { householderQr } from './qr.js';

export interface SvdResult {
  readonly u: Float64Array;
  readonly s: Float64Array;
  /** V: [n, n] row-major, column j is the j-th right singular vector. */
  readonly v: Float64Array;
}

const MAX_SWEEPS = 60;

export function thinSvd(a: Float64Array, m: number, n: number): SvdResult {
  if (m < n) throw new SoppuError('LINALG', `thinSvd needs a tall matrix, got [${m}, ${n}]`, { limit: 'rows ≥ columns' });
  const { q, r } = householderQr(a, m, n);
  // One-sided Jacobi on W = R (columns rotated until mutually orthogonal), V accumulates rotations.
  const w = Float64Array.from(r);
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  // a column below 1e-15 of the matrix's norm is numerically zero: rotating it against another changes
  // nothing (and with its squared norm underflowed to 0, the relative test below could never pass)
  let frobeniusSq = 0;
  for (const value of w) frobeniusSq += value * value;
  const negligible = 1e-30 * frobeniusSq;
  let converged = n <= 1 || frobeniusSq === 0;
  for (let sweep = 0; sweep < MAX_SWEEPS && !converged; sweep++) {
    converged = true;
    for (let p = 0; p < n - 1; p++) {
      for (let k = p + 1; k < n; k++) {
        let alpha = 0, beta = 0, gamma = 0;
        for (let i = 0; i < n; i++) {
          const wp = w[i * n + p]!, wk = w[i * n + k]!;
          alpha += wp * wp; beta += wk * wk; gamma += wp * wk;
        }
        if (gamma === 0 || alpha <= negligible || beta <= negligible || Math.abs(gamma) <= 1e-15 * Math.sqrt(alpha * beta)) continue;
        converged = false;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = Math.sign(zeta || 1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        for (let i = 0; i < n; i++) {
          const wp = w[i * n + p]!, wk = w[i * n + k]!;
          w[i * n + p] = c * wp - s * wk;
          w[i * n + k] = s * wp + c * wk;
          const vp = v[i * n + p]!, vk = v[i * n + k]!;
          v[i * n + p] = c * vp - s * vk;
          v[i * n + k] = s * vp + c * vk;
        }
      }
    }
  }
  if (!converged) throw new SoppuError('LINALG', `thinSvd: one-sided Jacobi did not converge in ${MAX_SWEEPS} sweeps (n = ${n})`, { limit: MAX_SWEEPS });
  const norms = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    let sum = 0;
    for (let i = 0; i < n; i++) sum += w[i * n + j]! ** 2;
    norms[j] = Math.sqrt(sum);
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => norms[y]! - norms[x]!);
  const s = new Float64Array(n);
  const smallU = new Float64Array(n * n);
  const sortedV = new Float64Array(n * n);
  order.forEach((source, target) => {
    // a negligible column was not orthogonalised against the others: a zero singular value, completed below
    const sigma = norms[source]! ** 2 <= negligible ? 0 : norms[source]!;
    s[target] = sigma;
    for (let i = 0; i < n; i++) {
      smallU[i * n + target] = sigma > 0 ? w[i * n + source]! / sigma : 0;
      sortedV[i * n + target] = v[i * n + source]!;
    }
  });
  // Zero singular values leave zero columns in smallU; complete them to an orthonormal set.
  completeOrthonormal(smallU, n, s);
  return { u: multiply(false, false, m, n, n, q, smallU), s, v: sortedV };
}

/**
 * Replaces the columns of U [n, n] whose singular value is 0 by unit vectors orthogonal to the rest: per column,
 * the unit vector eₖ with the largest part outside the columns so far (their span has dimension < n, so the parts'
 * squared norms add up to at least 1 and the largest is at least 1/n), orthogonalised twice. A first eₖ with half
 * its length left could be missing: then the column stayed 0.
 */
function completeOrthonormal(u: Float64Array, n: number, s: Float64Array): void {
  const valid = (other: number, j: number): boolean => other !== j && (s[other]! > 0 || other < j);
  const orthogonalise = (column: Float64Array, j: number): void => {
    for (let other = 0; other < n; other++) {
      if (!valid(other, j)) continue;
      let projection = 0;
      for (let i = 0; i < n; i++) projection += u[i * n + other]! * column[i]!;
      for (let i = 0; i < n; i++) column[i]! -= projection * u[i * n + other]!;
    }
  };
  const norm = (column: Float64Array): number => Math.sqrt(column.reduce((sum, x) => sum + x * x, 0));
  for (let j = 0; j < n; j++) {
    if (s[j]! > 0) continue;
    let best: Float64Array | null = null;
    let bestNorm = -1;
    for (let candidate = 0; candidate < n; candidate++) {
      const column = new Float64Array(n);
      column[candidate] = 1;
      orthogonalise(column, j);
      const length = norm(column);
      if (length > bestNorm) {
        best = column;
        bestNorm = length;
      }
    }
    orthogonalise(best!, j); // twice: one Gram–Schmidt pass leaves rounding along the others
    const length = norm(best!);
    for (let i = 0; i < n; i++) u[i * n + j] = best![i]! / length;
  }
}
