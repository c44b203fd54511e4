/**
 * Reconstruction errors in factored form. For ΔW = s·B·A and a compressed part U·Σ·Vᵀ:
 *   ‖ΔW − UΣVᵀ‖² = ‖ΔW‖² − 2·s·⟨(BᵀU)·Σ, A·V⟩ + ⟨Σ, (UᵀU)·Σ·(VᵀV)⟩
 * with ‖ΔW‖² = s²·trace((BᵀB)(AAᵀ)). Nothing [out, in] is formed; U, V need not be orthonormal
 * (they are f32 once stored), so the general formula is used.
 */
import type { LoraModule } from '../io/lora-types.js';
import { multiply, solveSymmetric, toF64 } from '../linalg/index.js';
import { factoredNormSquared } from './slot-problem.js';

/** A compressed representation of one adapter's slot, as stored. */
export interface CompressedPart {
  /** U: [out, rank] f32 */
  readonly u: Float32Array;
  /** Vᵀ: [rank, in] f32 */
  readonly vt: Float32Array;
  readonly rank: number;
  /** [rank, rank] (full) or [rank] (diagonal), scale folded in. */
  readonly core: Float32Array;
  readonly diagonal: boolean;
}

/** ‖ΔW − U·Σ·Vᵀ‖_F / ‖ΔW‖_F for one module (0 when both are zero; Infinity when only ΔW is). */
export function relativeErrorOfPart(module: LoraModule, part: CompressedPart): number {
  const { rank: r, inFeatures, outFeatures, scale } = module;
  const rank = part.rank;
  const deltaSquared = factoredNormSquared(module.a, module.b, r, inFeatures, outFeatures, scale);
  const u = toF64(part.u);
  const vt = toF64(part.vt);
  const core = fullCore(part.core, rank, part.diagonal);
  const bu = multiply(true, false, r, rank, outFeatures, toF64(module.b), u); // BᵀU: [r, R]
  const av = multiply(false, true, r, rank, inFeatures, toF64(module.a), vt); // A·V: [r, R]
  const buCore = multiply(false, false, r, rank, rank, bu, core);
  let cross = 0;
  for (let j = 0; j < buCore.length; j++) cross += buCore[j]! * av[j]!;
  cross *= scale;
  const gramU = multiply(true, false, rank, rank, outFeatures, u, u);
  const gramV = multiply(false, true, rank, rank, inFeatures, vt, vt);
  const sandwich = multiply(false, false, rank, rank, rank, multiply(false, false, rank, rank, rank, gramU, core), gramV);
  let reconstructionSquared = 0;
  for (let j = 0; j < core.length; j++) reconstructionSquared += core[j]! * sandwich[j]!;
  if (deltaSquared === 0) return reconstructionSquared > 0 ? Number.POSITIVE_INFINITY : 0;
  const errorSquared = Math.max(0, deltaSquared - 2 * cross + reconstructionSquared);
  return Math.sqrt(errorSquared / deltaSquared);
}

/** A diagonal core widened to [R, R]; a full core copied to f64. */
function fullCore(core: Float32Array, rank: number, diagonal: boolean): Float64Array {
  if (!diagonal) return toF64(core);
  const out = new Float64Array(rank * rank);
  for (let j = 0; j < rank; j++) out[j * rank + j] = core[j]!;
  return out;
}

/**
 * Best core of one module on fixed bases U [out, R], V [in, R] (f64): JD-Full Σ = UᵀΔWV (U, V
 * orthonormal); JD-Diag σ from (UᵀU ∘ VᵀV)·σ = diag(UᵀΔWV). Returns the core (scale folded in) and
 * its relative error computed for these f64 bases.
 */
export function bestCoreOnBases(module: Pick<LoraModule, 'a' | 'b' | 'rank' | 'inFeatures' | 'outFeatures' | 'scale'>,
  u: Float64Array, v: Float64Array, rank: number, diagonal: boolean, deltaSquared: number): { core: Float64Array; relativeError: number } {
  const { rank: r, inFeatures, outFeatures, scale } = module;
  const bu = multiply(true, false, r, rank, outFeatures, toF64(module.b), u); // BᵀU: [r, R]
  const av = multiply(false, false, r, rank, inFeatures, toF64(module.a), v); // A·V: [r, R]
  if (!diagonal) {
    const core = multiply(true, false, rank, rank, r, bu, av);
    let coreSquared = 0;
    for (let j = 0; j < core.length; j++) { core[j]! *= scale; coreSquared += core[j]! ** 2; }
    const relativeError = deltaSquared === 0 ? 0 : Math.sqrt(Math.max(0, deltaSquared - coreSquared) / deltaSquared);
    return { core, relativeError };
  }
  const gramU = multiply(true, false, rank, rank, outFeatures, u, u);
  const gramV = multiply(true, false, rank, rank, inFeatures, v, v);
  const hadamard = new Float64Array(rank * rank);
  for (let j = 0; j < hadamard.length; j++) hadamard[j] = gramU[j]! * gramV[j]!;
  const rhs = new Float64Array(rank);
  for (let t = 0; t < r; t++) for (let j = 0; j < rank; j++) rhs[j]! += scale * bu[t * rank + j]! * av[t * rank + j]!;
  const sigma = solveSymmetric(hadamard, rhs, rank, 1);
  let cross = 0, quadratic = 0;
  for (let j = 0; j < rank; j++) {
    cross += sigma[j]! * rhs[j]!;
    for (let l = 0; l < rank; l++) quadratic += sigma[j]! * hadamard[j * rank + l]! * sigma[l]!;
  }
  const relativeError = deltaSquared === 0 ? 0 : Math.sqrt(Math.max(0, deltaSquared - 2 * cross + quadratic) / deltaSquared);
  return { core: sigma, relativeError };
}
