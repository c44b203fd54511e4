import type { LoraModule } from './lora-types.js';

/**
 * ‖scale·B·A‖_F in factored form: |scale|·sqrt(trace((BᵀB)(AAᵀ))), never forming the dense
 * [out, in] matrix. Accumulates in f64. O(r²·(in + out)).
 */
export function frobeniusNormOfDelta(module: Pick<LoraModule, 'rank' | 'inFeatures' | 'outFeatures' | 'a' | 'b' | 'scale'>): number {
  const { rank, inFeatures, outFeatures, a, b } = module;
  // gramA = A·Aᵀ: [rank, rank]; gramB = Bᵀ·B: [rank, rank]
  const gramA = new Float64Array(rank * rank);
  const gramB = new Float64Array(rank * rank);
  for (let i = 0; i < rank; i++) {
    for (let j = i; j < rank; j++) {
      let sum = 0;
      const rowI = i * inFeatures;
      const rowJ = j * inFeatures;
      for (let k = 0; k < inFeatures; k++) sum += a[rowI + k]! * a[rowJ + k]!;
      gramA[i * rank + j] = sum;
      gramA[j * rank + i] = sum;
    }
  }
  for (let o = 0; o < outFeatures; o++) {
    const row = o * rank;
    for (let i = 0; i < rank; i++) {
      const bi = b[row + i]!;
      if (bi === 0) continue;
      for (let j = i; j < rank; j++) gramB[i * rank + j] = gramB[i * rank + j]! + bi * b[row + j]!;
    }
  }
  // trace(gramB·gramA) = Σ_ij gramB[i,j]·gramA[j,i]; gramB holds only its upper triangle.
  let trace = 0;
  for (let i = 0; i < rank; i++) {
    trace += gramB[i * rank + i]! * gramA[i * rank + i]!;
    for (let j = i + 1; j < rank; j++) trace += 2 * gramB[i * rank + j]! * gramA[i * rank + j]!;
  }
  return Math.abs(module.scale) * Math.sqrt(Math.max(0, trace));
}
