import { describe, expect, it } from 'vitest';
import {
  householderQr, multiply, randomizedRangeFinder, solveSymmetric, symmetricEigen, thinSvd, topEigenvectorsPsd, transpose,
} from '../../src/linalg/index.js';
import { Random } from '../../src/tensor/random.js';

function randomMatrix(rows: number, cols: number, seed: number): Float64Array {
  return new Random(seed).fillNormal(new Float64Array(rows * cols));
}

function maxAbsDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!));
  return max;
}

function expectOrthonormalColumns(q: Float64Array, rows: number, cols: number): void {
  const gram = multiply(true, false, cols, cols, rows, q, q);
  for (let i = 0; i < cols; i++) for (let j = 0; j < cols; j++) expect(Math.abs(gram[i * cols + j]! - (i === j ? 1 : 0))).toBeLessThan(1e-12);
}

/** Rank-k matrix with chosen singular values: [m, n]. */
function plantedMatrix(m: number, n: number, singular: number[], seed: number): Float64Array {
  const k = singular.length;
  const u = householderQr(randomMatrix(m, k, seed), m, k).q;
  const v = householderQr(randomMatrix(n, k, seed + 1), n, k).q;
  for (let i = 0; i < m; i++) for (let j = 0; j < k; j++) u[i * k + j]! *= singular[j]!;
  return multiply(false, true, m, n, k, u, v);
}

describe('householderQr', () => {
  it('factors a tall matrix into orthonormal Q and upper-triangular R', () => {
    const a = randomMatrix(13, 5, 1);
    const { q, r } = householderQr(a, 13, 5);
    expectOrthonormalColumns(q, 13, 5);
    for (let i = 0; i < 5; i++) for (let j = 0; j < i; j++) expect(r[i * 5 + j]).toBe(0);
    expect(maxAbsDifference(multiply(false, false, 13, 5, 5, q, r), a)).toBeLessThan(1e-12);
  });

  it('keeps Q orthonormal for rank-deficient input (zero and repeated columns)', () => {
    const a = randomMatrix(9, 4, 2);
    for (let i = 0; i < 9; i++) { a[i * 4 + 1] = 0; a[i * 4 + 3] = a[i * 4]!; }
    const { q, r } = householderQr(a, 9, 4);
    expectOrthonormalColumns(q, 9, 4);
    expect(maxAbsDifference(multiply(false, false, 9, 4, 4, q, r), a)).toBeLessThan(1e-12);
  });

  it('refuses a wide matrix', () => {
    expect(() => householderQr(new Float64Array(6), 2, 3)).toThrow(/tall/);
  });
});

describe('symmetricEigen', () => {
  it('diagonalises a symmetric matrix with eigenvalues sorted descending', () => {
    const n = 7;
    const x = randomMatrix(n, n, 3);
    const s = multiply(true, false, n, n, n, x, x);
    for (let i = 0; i < n; i++) s[i * n + i]! -= 3; // indefinite
    const { values, vectors } = symmetricEigen(s, n);
    expectOrthonormalColumns(vectors, n, n);
    for (let i = 1; i < n; i++) expect(values[i]!).toBeLessThanOrEqual(values[i - 1]!);
    const sv = multiply(false, false, n, n, n, s, vectors);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) expect(sv[i * n + j]!).toBeCloseTo(vectors[i * n + j]! * values[j]!, 10);
  });
});

describe('tridiagonal QL eigen (n > 32)', () => {
  it('agrees with Jacobi and diagonalises, including repeated and zero eigenvalues', async () => {
    const { jacobiEigen, tridiagonalQlEigen } = await import('../../src/linalg/symmetric-eigen.js');
    for (const [n, rank] of [[50, 50], [71, 5], [40, 0]] as const) {
      const x = randomMatrix(n, Math.max(rank, 1), 30 + n);
      const s = rank === 0 ? new Float64Array(n * n) : multiply(false, true, n, n, rank, x, x);
      for (let i = 0; i < n; i++) s[i * n + i]! += 2; // eigenvalue 2 repeated n − rank times
      const ql = tridiagonalQlEigen(s, n);
      const jacobi = jacobiEigen(s, n);
      expect(maxAbsDifference(ql.values, jacobi.values)).toBeLessThan(1e-9 * Math.max(1, Math.abs(jacobi.values[0]!)));
      expectOrthonormalColumns(ql.vectors, n, n);
      const sv = multiply(false, false, n, n, n, s, ql.vectors);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) expect(Math.abs(sv[i * n + j]! - ql.vectors[i * n + j]! * ql.values[j]!)).toBeLessThan(1e-9 * Math.max(1, ql.values[0]!));
    }
  });
});

describe('thinSvd', () => {
  it('recovers planted singular values and reconstructs the matrix', () => {
    const a = plantedMatrix(20, 6, [5, 3, 2, 1, 0.5, 0.25], 4);
    const { u, s, v } = thinSvd(a, 20, 6);
    expect(maxAbsDifference(s, [5, 3, 2, 1, 0.5, 0.25])).toBeLessThan(1e-12);
    expectOrthonormalColumns(u, 20, 6);
    expectOrthonormalColumns(v, 6, 6);
    const us = u.slice();
    for (let i = 0; i < 20; i++) for (let j = 0; j < 6; j++) us[i * 6 + j]! *= s[j]!;
    expect(maxAbsDifference(multiply(false, true, 20, 6, 6, us, v), a)).toBeLessThan(1e-12);
  });

  it('completes U to orthonormal columns when singular values are zero', () => {
    const a = plantedMatrix(10, 5, [2, 1], 5);
    const { u, s } = thinSvd(a, 10, 5);
    expect(s[2]!).toBeLessThan(1e-12);
    expectOrthonormalColumns(u, 10, 5);
  });
  it('completes U to orthonormal columns when many singular values are zero and the others spread over every coordinate', () => {
    for (const seed of [3, 4, 5]) {
      const random = new Random(seed);
      const n = 100;
      const a = random.fillNormal(new Float64Array(n * n), 1);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) a[i * n + j]! *= 10 ** -(j % 20); // columns scaled 1 … 1e-19
      const { u, s } = thinSvd(a, n, n);
      expect(Array.from(s).filter((x) => x === 0).length, `seed ${seed}`).toBeGreaterThan(10);
      const gram = multiply(true, false, n, n, n, u, u);
      let worst = 0;
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) worst = Math.max(worst, Math.abs(gram[i * n + j]! - (i === j ? 1 : 0)));
      expect(worst, `seed ${seed}`).toBeLessThan(1e-10);
    }
  });

  it('converges when all but a few columns are rounding noise (squared norms underflowing to 0)', () => {
    // a rank-1 7×7 matrix plus noise far below its norm, as a low-rank mean core is: the relative
    // orthogonality test alone never passed (beta underflows to 0 while gamma does not)
    const random = new Random(4);
    const a = new Float64Array(49);
    for (let i = 0; i < 7; i++) a[i * 7] = 1 + i;
    for (let i = 0; i < 7; i++) for (let j = 1; j < 7; j++) a[i * 7 + j] = (random.nextUint32() / 2 ** 32 - 0.5) * 1e-170;
    const { s, u, v } = thinSvd(a, 7, 7);
    const norm = Math.sqrt([1, 2, 3, 4, 5, 6, 7].reduce((sum, x) => sum + x * x, 0));
    expect(s[0]).toBeCloseTo(norm, 12);
    for (let k = 1; k < 7; k++) expect(s[k]).toBeLessThan(1e-160);
    // the rank-1 part is reconstructed
    for (let i = 0; i < 7; i++) expect(u[i * 7]! * s[0]! * v[0]!).toBeCloseTo(a[i * 7]!, 10);
  });
});

describe('solveSymmetric', () => {
  it('solves a positive-definite system and falls back to the pseudo-inverse when singular', () => {
    const x = randomMatrix(6, 4, 6);
    const s = multiply(true, false, 4, 4, 6, x, x);
    const b = randomMatrix(4, 2, 7);
    const solution = solveSymmetric(s, b, 4, 2);
    expect(maxAbsDifference(multiply(false, false, 4, 2, 4, s, solution), b)).toBeLessThan(1e-10);
    const singular = new Float64Array([1, 0, 0, 0]);
    expect([...solveSymmetric(singular, new Float64Array([2, 3]), 2, 1)]).toEqual([2, 0]);
  });
});

describe('randomized range finder and top eigenvectors', () => {
  it('captures the range of a low-rank operator to working precision', () => {
    const m = 60, n = 40;
    const a = plantedMatrix(m, n, [4, 3, 2, 1], 8);
    const at = transpose(a, m, n);
    const operator = {
      rows: m, cols: n,
      apply: (x: Float64Array, k: number) => multiply(false, false, m, k, n, a, x),
      applyTranspose: (y: Float64Array, k: number) => multiply(false, false, n, k, m, at, y),
    };
    const { q, width } = randomizedRangeFinder(operator, 4, { random: new Random(9) });
    expect(width).toBe(6);
    expectOrthonormalColumns(q, m, width);
    // ‖A − QQᵀA‖ ≈ 0
    const residual = a.slice();
    const projected = multiply(false, false, m, n, width, q, multiply(true, false, width, n, m, q, a));
    for (let i = 0; i < residual.length; i++) residual[i]! -= projected[i]!;
    expect(Math.max(...residual.map(Math.abs))).toBeLessThan(1e-10);
  });

  it('finds the top eigenvectors of a PSD operator and never loses Ritz value against its start', () => {
    const dim = 80, rank = 3;
    const factor = plantedMatrix(dim, 10, [10, 8, 6, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 10);
    const g = multiply(false, true, dim, dim, 10, factor, factor);
    const applyG = (x: Float64Array, k: number): Float64Array => multiply(false, false, dim, k, dim, g, x);
    const exact = symmetricEigen(g, dim);
    const { values, vectors } = topEigenvectorsPsd(applyG, dim, rank, { random: new Random(11), powerIterations: 3 });
    for (let j = 0; j < rank; j++) expect(values[j]!).toBeCloseTo(exact.values[j]!, 8);
    expectOrthonormalColumns(vectors, dim, rank);
    // a poor start: trace(UᵀGU) must not drop
    const start = householderQr(randomMatrix(dim, rank, 12), dim, rank).q;
    const traceOf = (u: Float64Array): number => {
      const gu = applyG(u, rank);
      let sum = 0;
      for (let i = 0; i < u.length; i++) sum += u[i]! * gu[i]!;
      return sum;
    };
    const refined = topEigenvectorsPsd(applyG, dim, rank, { random: new Random(13), start, startWidth: rank, powerIterations: 0 });
    expect(traceOf(refined.vectors)).toBeGreaterThanOrEqual(traceOf(start) - 1e-12);
  });
});

describe('orthonormalColumns', () => {
  it('spans the same space as Householder for well-conditioned input, and stays orthonormal for rank-deficient input', async () => {
    const { orthonormalColumns } = await import('../../src/linalg/index.js');
    const a = randomMatrix(40, 6, 21);
    const q = orthonormalColumns(a, 40, 6);
    expectOrthonormalColumns(q, 40, 6);
    // A = Q·(QᵀA)
    const back = multiply(false, false, 40, 6, 6, q, multiply(true, false, 6, 6, 40, q, a));
    expect(maxAbsDifference(back, a)).toBeLessThan(1e-12);
    const deficient = a.slice();
    for (let i = 0; i < 40; i++) deficient[i * 6 + 5] = deficient[i * 6]! * 2;
    expectOrthonormalColumns(orthonormalColumns(deficient, 40, 6), 40, 6);
  });
});
