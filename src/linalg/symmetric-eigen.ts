/**
 * Eigendecomposition of a symmetric matrix: cyclic Jacobi rotations for small n (accurate to working
 * precision, O(n³) per sweep), Householder tridiagonalisation + implicit QL (the EISPACK tred2/tql2
 * pair, ≈ 4n³ flops in all) beyond JACOBI_MAX_N.
 */
import { SoppuError } from '../errors/soppu-error.js';

export interface SymmetricEigenResult {
  /** Eigenvalues, sorted descending. */
  readonly values: Float64Array;
  /** Eigenvectors as columns: [n, n] row-major, column j belongs to values[j]. */
  readonly vectors: Float64Array;
}

const MAX_SWEEPS = 60;
const JACOBI_MAX_N = 32;

export function symmetricEigen(matrix: Float64Array, n: number): SymmetricEigenResult {
  if (matrix.length < n * n) throw new SoppuError('LINALG', `symmetricEigen: array holds ${matrix.length} values, [${n}, ${n}] needs ${n * n}`);
  return n <= JACOBI_MAX_N ? jacobiEigen(matrix, n) : tridiagonalQlEigen(matrix, n);
}

/** Cyclic Jacobi (exported for the differential test). */
export function jacobiEigen(matrix: Float64Array, n: number): SymmetricEigenResult {
  const a = new Float64Array(n * n);
  // symmetrise: the callers' products are symmetric up to rounding
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j] = 0.5 * (matrix[i * n + j]! + matrix[j * n + i]!);
  const v = new Float64Array(n * n);
  for (let i = 0; i < n; i++) v[i * n + i] = 1;
  let total = 0;
  for (let i = 0; i < n * n; i++) total += a[i]! * a[i]!;
  const threshold = 1e-30 * Math.max(total, Number.MIN_VALUE);
  let converged = n <= 1;
  for (let sweep = 0; sweep < MAX_SWEEPS && !converged; sweep++) {
    let offDiagonal = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) offDiagonal += a[p * n + q]! ** 2;
    if (offDiagonal <= threshold) { converged = true; break; }
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = a[p * n + q]!;
        if (apq === 0) continue;
        const app = a[p * n + p]!;
        const aqq = a[q * n + q]!;
        const theta = (aqq - app) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        // A ← Jᵀ A J on rows/columns p, q
        for (let k = 0; k < n; k++) {
          const akp = a[k * n + p]!;
          const akq = a[k * n + q]!;
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p * n + k]!;
          const aqk = a[q * n + k]!;
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = v[k * n + p]!;
          const vkq = v[k * n + q]!;
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  if (!converged) {
    let offDiagonal = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) offDiagonal += a[p * n + q]! ** 2;
    if (offDiagonal > 1e-20 * Math.max(total, Number.MIN_VALUE)) {
      throw new SoppuError('LINALG', `symmetricEigen: Jacobi did not converge in ${MAX_SWEEPS} sweeps (n = ${n})`, { limit: MAX_SWEEPS });
    }
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => a[y * n + y]! - a[x * n + x]!);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n);
  order.forEach((source, target) => {
    values[target] = a[source * n + source]!;
    for (let k = 0; k < n; k++) vectors[k * n + target] = v[k * n + source]!;
  });
  return { values, vectors };
}

/**
 * Householder reduction to tridiagonal form (tred2) then the implicit QL algorithm with Wilkinson
 * shifts (tql2), accumulating the eigenvectors. Works on z: [n, n] row-major; d: diagonal, e: off-diagonal.
 */
export function tridiagonalQlEigen(matrix: Float64Array, n: number): SymmetricEigenResult {
  const z = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) z[i * n + j] = 0.5 * (matrix[i * n + j]! + matrix[j * n + i]!);
  const d = new Float64Array(n);
  const e = new Float64Array(n);
  // tred2
  for (let j = 0; j < n; j++) d[j] = z[(n - 1) * n + j]!;
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]!);
    if (scale === 0) {
      e[i] = d[i - 1]!;
      for (let j = 0; j < i; j++) {
        d[j] = z[(i - 1) * n + j]!;
        z[i * n + j] = 0;
        z[j * n + i] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) { d[k]! /= scale; h += d[k]! * d[k]!; }
      let f = d[i - 1]!;
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        z[j * n + i] = f;
        g = e[j]! + z[j * n + j]! * f;
        for (let k = j + 1; k <= i - 1; k++) {
          g += z[k * n + j]! * d[k]!;
          e[k]! += z[k * n + j]! * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) { e[j]! /= h; f += e[j]! * d[j]!; }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j]! -= hh * d[j]!;
      for (let j = 0; j < i; j++) {
        f = d[j]!;
        g = e[j]!;
        for (let k = j; k <= i - 1; k++) z[k * n + j]! -= f * e[k]! + g * d[k]!;
        d[j] = z[(i - 1) * n + j]!;
        z[i * n + j] = 0;
      }
    }
    d[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    z[(n - 1) * n + i] = z[i * n + i]!;
    z[i * n + i] = 1;
    const h = d[i + 1]!;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = z[k * n + i + 1]! / h;
      for (let j = 0; j <= i; j++) {
        let g = 0;
        for (let k = 0; k <= i; k++) g += z[k * n + i + 1]! * z[k * n + j]!;
        for (let k = 0; k <= i; k++) z[k * n + j]! -= g * d[k]!;
      }
    }
    for (let k = 0; k <= i; k++) z[k * n + i + 1] = 0;
  }
  for (let j = 0; j < n; j++) { d[j] = z[(n - 1) * n + j]!; z[(n - 1) * n + j] = 0; }
  z[(n - 1) * n + n - 1] = 1;
  e[0] = 0;
  // tql2
  for (let i = 1; i < n; i++) e[i - 1] = e[i]!;
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]!) + Math.abs(e[l]!));
    let m = l;
    while (m < n) {
      if (Math.abs(e[m]!) <= eps * tst1) break;
      m++;
    }
    if (m > l) {
      let iterations = 0;
      do {
        if (++iterations > 60) throw new SoppuError('LINALG', `symmetricEigen: QL did not converge for eigenvalue ${l} (n = ${n})`, { limit: 60 });
        let g = d[l]!;
        let p = (d[l + 1]! - g) / (2 * e[l]!);
        let r = Math.hypot(p, 1);
        if (p < 0) r = -r;
        d[l] = e[l]! / (p + r);
        d[l + 1] = e[l]! * (p + r);
        const dl1 = d[l + 1]!;
        let h = g - d[l]!;
        for (let i = l + 2; i < n; i++) d[i]! -= h;
        f += h;
        p = d[m]!;
        let c = 1, c2 = c, c3 = c;
        const el1 = e[l + 1]!;
        let s = 0, s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i]!;
          h = c * p;
          r = Math.hypot(p, e[i]!);
          e[i + 1] = s * r;
          s = e[i]! / r;
          c = p / r;
          p = c * d[i]! - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]!);
          for (let k = 0; k < n; k++) {
            const zk1 = z[k * n + i + 1]!;
            const zk = z[k * n + i]!;
            z[k * n + i + 1] = s * zk + c * zk1;
            z[k * n + i] = c * zk - s * zk1;
          }
        }
        p = -s * s2 * c3 * el1 * e[l]! / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]!) > eps * tst1);
    }
    d[l] = d[l]! + f;
    e[l] = 0;
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => d[y]! - d[x]!);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n);
  order.forEach((source, target) => {
    values[target] = d[source]!;
    for (let k = 0; k < n; k++) vectors[k * n + target] = z[k * n + source]!;
  });
  return { values, vectors };
}
