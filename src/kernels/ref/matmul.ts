import type { WeightMatrix } from '../../tensor/weight-matrix.js';
import { bf16ToF32, f16ToF32 } from '../../tensor/dtype.js';

/** y[M,N] = x[M,K] · W[N,K]ᵀ (or +=). The spec: one row of W widened at a time, f32 accumulation in f64. */
export function matmul(y: Float32Array, x: Float32Array, w: WeightMatrix, m: number, accumulate = false): void {
  const n = w.rows;
  const k = w.cols;
  const row = new Float32Array(k);
  for (let j = 0; j < n; j++) {
    // widen W[j,:] once, reuse for every row of x
    if (w.dtype === 'f32') row.set((w.data as Float32Array).subarray(j * k, j * k + k));
    else {
      const convert = w.dtype === 'bf16' ? bf16ToF32 : f16ToF32;
      for (let c = 0; c < k; c++) row[c] = convert(w.data[j * k + c]!);
    }
    for (let i = 0; i < m; i++) {
      let sum = 0;
      const xBase = i * k;
      for (let c = 0; c < k; c++) sum += x[xBase + c]! * row[c]!;
      y[i * n + j] = accumulate ? y[i * n + j]! + sum : sum;
    }
  }
}
