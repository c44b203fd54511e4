/**
 * Projection of a new adapter onto an existing bank's bases, no refit (used by `bank add`):
 * picks the cluster whose bases reconstruct it best over its slots, then per slot JD-Full
 * Σ = UᵀΔWV or the JD-Diag σ solve. Slots the bank lacks, and slots over the budget, stay raw.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { toF32, toF64, transpose } from '../linalg/index.js';
import { checkFinitePart, rawResult } from './compress-adapters.js';
import type { AdapterSlotResult, JdMethod, SlotBases } from './compression-types.js';
import { bestCoreOnBases, relativeErrorOfPart } from './slot-errors.js';
import { factoredNormSquared } from './slot-problem.js';

export interface BankSlotBases {
  readonly method: JdMethod;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly bases: readonly (SlotBases | null)[];
}

export interface Projection {
  readonly cluster: number;
  readonly slots: Map<string, AdapterSlotResult>;
  /** Largest relative error among the compressed slots (0 when none). */
  readonly maxError: number;
}

export function projectAdapter(adapter: LoraAdapter, slots: ReadonlyMap<string, BankSlotBases>,
  options: { maxError?: number }): Projection {
  const name = adapter.source || 'the new adapter';
  let clusterCount = 0;
  for (const slot of slots.values()) clusterCount = Math.max(clusterCount, slot.bases.length);
  const norms = new Map<string, number>();
  for (const module of adapter.modules.values()) {
    const slot = slots.get(module.path);
    if (slot && (slot.inFeatures !== module.inFeatures || slot.outFeatures !== module.outFeatures)) {
      throw new SoppuError('ADAPTER_INCOMPATIBLE',
        `${name}: ${module.path} is [out ${module.outFeatures}, in ${module.inFeatures}] but the bank's slot is [out ${slot.outFeatures}, in ${slot.inFeatures}]`,
        { tensor: module.path, file: adapter.source });
    }
    const normSquared = factoredNormSquared(module.a, module.b, module.rank, module.inFeatures, module.outFeatures, module.scale);
    if (!Number.isFinite(normSquared)) throw new SoppuError('ADAPTER_TENSORS', `${name}: ${module.path} has non-finite values`, { tensor: module.path, file: adapter.source });
    norms.set(module.path, normSquared);
  }
  // widened bases, computed once per (slot, cluster)
  const widened = new Map<string, { u: Float64Array; v: Float64Array } | null>();
  const basesOf = (path: string, cluster: number): { u: Float64Array; v: Float64Array; rank: number } | null => {
    const bases = slots.get(path)?.bases[cluster] ?? null;
    if (!bases) return null;
    const key = `${cluster}\u0000${path}`;
    let hit = widened.get(key);
    if (hit === undefined) {
      const slot = slots.get(path)!;
      hit = { u: toF64(bases.u), v: transpose(toF64(bases.vt), bases.rank, slot.inFeatures) };
      widened.set(key, hit);
    }
    return hit && { ...hit, rank: bases.rank };
  };
  // choose the cluster: sum over slots of relative squared error (1 where the cluster has no bases)
  let cluster = 0;
  let bestCost = Number.POSITIVE_INFINITY;
  for (let c = 0; c < clusterCount; c++) {
    let cost = 0;
    for (const module of adapter.modules.values()) {
      const slot = slots.get(module.path);
      const normSquared = norms.get(module.path)!;
      if (!slot || normSquared === 0) continue;
      const bases = basesOf(module.path, c);
      if (!bases) { cost += 1; continue; }
      const { relativeError } = bestCoreOnBases(module, bases.u, bases.v, bases.rank, slot.method === 'jd-diag', normSquared);
      cost += relativeError * relativeError;
    }
    if (cost < bestCost) { bestCost = cost; cluster = c; }
  }
  const results = new Map<string, AdapterSlotResult>();
  let maxError = 0;
  for (const module of adapter.modules.values()) {
    const normSquared = norms.get(module.path)!;
    if (normSquared === 0) { results.set(module.path, { storage: 'zero', relativeError: 0 }); continue; }
    const slot = slots.get(module.path);
    const bases = slot ? basesOf(module.path, cluster) : null;
    const stored = slot?.bases[cluster];
    // a slot new to the bank is kept raw until a refit fits bases for it; a slot whose chosen cluster has no bases
    // is raw there by the bank's own choice (cheaper than bases), which a refit would make again
    if (!slot) { results.set(module.path, rawResult(module, 'projection-over-budget')); continue; }
    if (!bases || !stored) { results.set(module.path, rawResult(module, 'cheaper-raw')); continue; }
    const diagonal = slot.method === 'jd-diag';
    const core = toF32(bestCoreOnBases(module, bases.u, bases.v, bases.rank, diagonal, normSquared).core);
    const error = relativeErrorOfPart(module, { u: stored.u, vt: stored.vt, rank: stored.rank, core, diagonal });
    checkFinitePart(name, module.path, core, error);
    if (options.maxError !== undefined && !(error <= options.maxError)) {
      results.set(module.path, rawResult(module, 'projection-over-budget'));
      continue;
    }
    maxError = Math.max(maxError, error);
    results.set(module.path, { storage: 'compressed', core, relativeError: error });
  }
  return { cluster, slots: results, maxError };
}
