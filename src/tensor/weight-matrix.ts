import type { WeightDtype } from './dtype.js';
import { bf16ToF32, f16ToF32, holdsDtype, storedToF32 } from './dtype.js';

/**
 * A row-major weight matrix W[rows, cols] kept in its stored dtype (never widened in memory).
 * For a linear layer, rows = out features (N) and cols = in features (K): y = x · Wᵀ.
 * bf16 and f16 data are raw 16-bit patterns in a Uint16Array.
 */
export interface WeightMatrix {
  readonly dtype: WeightDtype;
  readonly rows: number;
  readonly cols: number;
  readonly data: Float32Array | Uint16Array;
}

/** Wrap data as a WeightMatrix, checking the element count. */
export function weightMatrix(dtype: WeightDtype, rows: number, cols: number, data: Float32Array | Uint16Array): WeightMatrix {
  if (!holdsDtype(dtype, data)) throw new TypeError(`weightMatrix: dtype ${dtype} does not match ${data.constructor.name}`);
  if (data.length !== rows * cols) throw new RangeError(`weightMatrix: ${data.length} elements for shape [${rows}, ${cols}]`);
  return { dtype, rows, cols, data };
}

/** Element (row, col) of W as f32 (slow; for references and tests). */
export function weightAt(w: WeightMatrix, row: number, col: number): number {
  return storedToF32(w.dtype, w.data[row * w.cols + col]!);
}

/** Row `row` of W widened to f32 into `dst` (for embedding gathers and references). */
export function weightRowToF32(w: WeightMatrix, row: number, dst: Float32Array, dstOffset = 0): void {
  const base = row * w.cols;
  if (w.dtype === 'f32') {
    dst.set((w.data as Float32Array).subarray(base, base + w.cols), dstOffset);
    return;
  }
  const convert = w.dtype === 'bf16' ? bf16ToF32 : f16ToF32;
  for (let c = 0; c < w.cols; c++) dst[dstOffset + c] = convert(w.data[base + c]!);
}
