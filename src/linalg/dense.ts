/**
 * Small dense helpers over row-major f64 matrices. Large products go through the KernelSet GEMM
 * (getKernels().gemmF64); everything here is shape bookkeeping around it.
 */
import { getKernels } from '../kernels/index.js';

/**
 * C = op(A) · op(B), a new [m, n] matrix. op(A) is [m, k]: A is [m, k] (or [k, m] when transA);
 * op(B) is [k, n]: B is [k, n] (or [n, k] when transB).
 */
export function multiply(transA: boolean, transB: boolean, m: number, n: number, k: number,
  a: Float64Array, b: Float64Array): Float64Array {
  const c = new Float64Array(m * n);
  if (m === 0 || n === 0 || k === 0) return c;
  getKernels().gemmF64(transA, transB, m, n, k, 1, a, transA ? m : k, b, transB ? k : n, 0, c, n);
  return c;
}

/** Aᵀ of a [rows, cols] matrix: a new [cols, rows] matrix. */
export function transpose(a: Float64Array, rows: number, cols: number): Float64Array {
  const t = new Float64Array(rows * cols);
  const tile = 32; // tiles keep both the reads and the strided writes in cache
  for (let i0 = 0; i0 < rows; i0 += tile) {
    const iEnd = Math.min(i0 + tile, rows);
    for (let j0 = 0; j0 < cols; j0 += tile) {
      const jEnd = Math.min(j0 + tile, cols);
      for (let i = i0; i < iEnd; i++) for (let j = j0; j < jEnd; j++) t[j * rows + i] = a[i * cols + j]!;
    }
  }
  return t;
}

/** [A | B] for A: [rows, colsA], B: [rows, colsB]. */
export function concatColumns(a: Float64Array, colsA: number, b: Float64Array, colsB: number, rows: number): Float64Array {
  const width = colsA + colsB;
  const out = new Float64Array(rows * width);
  for (let i = 0; i < rows; i++) {
    out.set(a.subarray(i * colsA, (i + 1) * colsA), i * width);
    out.set(b.subarray(i * colsB, (i + 1) * colsB), i * width + colsA);
  }
  return out;
}

/** Widens an f32 array to f64. */
export function toF64(a: Float32Array): Float64Array {
  return Float64Array.from(a);
}

/** Narrows an f64 array to f32. */
export function toF32(a: Float64Array): Float32Array {
  return Float32Array.from(a);
}
