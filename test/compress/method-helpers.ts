/** Dense references for the method tests (tiny shapes only). */
import type { LoraModule } from '../../src/io/lora-types.js';

/** Dense ΔW = s·B·A: [out, in]. */
export function denseDelta(module: LoraModule): Float64Array {
  const { rank, inFeatures, outFeatures, scale } = module;
  const delta = new Float64Array(outFeatures * inFeatures);
  for (let o = 0; o < outFeatures; o++) for (let p = 0; p < rank; p++) {
    const bValue = scale * module.b[o * rank + p]!;
    for (let i = 0; i < inFeatures; i++) delta[o * inFeatures + i]! += bValue * module.a[p * inFeatures + i]!;
  }
  return delta;
}

/** Dense U·Σ·Vᵀ from U [out, R], Vᵀ [R, in], Σ [R, R] or diagonal [R]. */
export function denseReconstruction(u: ArrayLike<number>, vt: ArrayLike<number>, core: ArrayLike<number>, rank: number,
  outFeatures: number, inFeatures: number, diagonal: boolean): Float64Array {
  const out = new Float64Array(outFeatures * inFeatures);
  for (let o = 0; o < outFeatures; o++) for (let p = 0; p < rank; p++) for (let q = 0; q < rank; q++) {
    const c = diagonal ? (p === q ? core[p]! : 0) : core[p * rank + q]!;
    if (c === 0) continue;
    const factor = u[o * rank + p]! * c;
    for (let i = 0; i < inFeatures; i++) out[o * inFeatures + i]! += factor * vt[q * inFeatures + i]!;
  }
  return out;
}

export function frobenius(a: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i]! * a[i]!;
  return Math.sqrt(sum);
}

export function relativeDenseError(delta: Float64Array, reconstruction: Float64Array): number {
  const difference = delta.map((value, i) => value - reconstruction[i]!);
  return frobenius(difference) / frobenius(delta);
}
