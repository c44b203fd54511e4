/**
 * Deterministic in-memory adapter sets for the method's tests and benchmark: planted shared
 * structure (ΔWᵢ = U·(CᵢDᵢ)·Vᵀ of rank K per slot, plus optional noise) or independent adapters,
 * with a controllable spread of norms. Nothing is written to disk.
 */
import type { LoraAdapter, LoraConfig, LoraModule } from '../io/lora-types.js';
import { Random } from '../tensor/random.js';

export interface SyntheticSlot {
  readonly path: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
}

export interface SyntheticSetOptions {
  readonly slots: readonly SyntheticSlot[];
  readonly count: number;
  /** LoRA rank r of every adapter, or one rank per adapter (mixed ranks). */
  readonly rank: number | readonly number[];
  /** K > 0: planted shared subspace of rank K per slot; 0: independent adapters. */
  readonly sharedRank: number;
  /** Relative noise added to each factor when planted (default 0). */
  readonly noise?: number;
  /** Norms of the deltas spread log-uniformly over [1/spread, spread] (default 1: all similar). */
  readonly normSpread?: number;
  /** A different seed for the shared bases gives a different family (default = seed). */
  readonly familySeed?: number;
  readonly seed: number;
  readonly baseModel?: string | null;
  /** Prefix of the generated ids (default "adapter-"). */
  readonly idPrefix?: string;
}

export function syntheticAdapterSet(options: SyntheticSetOptions): { id: string; adapter: LoraAdapter }[] {
  const k = options.sharedRank;
  const familyRandom = new Random(options.familySeed ?? options.seed ^ 0x5eed);
  const shared = options.slots.map((slot) => ({
    u: familyRandom.fillNormal(new Float64Array(slot.outFeatures * k), 1 / Math.sqrt(slot.outFeatures)),
    vt: familyRandom.fillNormal(new Float64Array(k * slot.inFeatures), 1 / Math.sqrt(slot.inFeatures)),
  }));
  const random = new Random(options.seed);
  const spread = options.normSpread ?? 1;
  const result: { id: string; adapter: LoraAdapter }[] = [];
  for (let index = 0; index < options.count; index++) {
    const rank = typeof options.rank === 'number' ? options.rank : options.rank[index % options.rank.length]!;
    const magnitude = spread === 1 ? 1 : Math.exp((2 * random.next() - 1) * Math.log(spread));
    const modules = new Map<string, LoraModule>();
    options.slots.forEach((slot, s) => {
      const { inFeatures, outFeatures } = slot;
      let a: Float32Array, b: Float32Array;
      if (k > 0) {
        const c = random.fillNormal(new Float64Array(k * rank));
        const d = random.fillNormal(new Float64Array(rank * k));
        b = new Float32Array(outFeatures * rank);
        a = new Float32Array(rank * inFeatures);
        const { u, vt } = shared[s]!;
        for (let o = 0; o < outFeatures; o++) for (let p = 0; p < rank; p++) {
          let sum = 0;
          for (let j = 0; j < k; j++) sum += u[o * k + j]! * c[j * rank + p]!;
          b[o * rank + p] = sum;
        }
        for (let p = 0; p < rank; p++) for (let i = 0; i < inFeatures; i++) {
          let sum = 0;
          for (let j = 0; j < k; j++) sum += d[p * k + j]! * vt[j * inFeatures + i]!;
          a[p * inFeatures + i] = sum;
        }
        const noise = options.noise ?? 0;
        if (noise > 0) {
          for (let j = 0; j < b.length; j++) b[j]! += noise * random.normal() / Math.sqrt(outFeatures);
          for (let j = 0; j < a.length; j++) a[j]! += noise * random.normal() / Math.sqrt(inFeatures);
        }
      } else {
        b = random.fillNormal(new Float32Array(outFeatures * rank), 1 / Math.sqrt(outFeatures));
        a = random.fillNormal(new Float32Array(rank * inFeatures), 1 / Math.sqrt(inFeatures));
      }
      const alpha = 2 * rank;
      const scale = (alpha / rank) * magnitude;
      modules.set(slot.path, syntheticModule(slot, rank, scale, alpha, a, b));
    });
    result.push({ id: `${options.idPrefix ?? 'adapter-'}${index}`, adapter: syntheticAdapter(modules, options.baseModel ?? 'soppu/synthetic', rank) });
  }
  return result;
}

export function syntheticModule(slot: SyntheticSlot, rank: number, scale: number, alpha: number, a: Float32Array, b: Float32Array): LoraModule {
  const match = /\.(\d+)\./.exec(slot.path);
  return {
    path: slot.path, layer: match ? Number(match[1]) : -1, module: slot.path.split('.').pop()!, rank,
    inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, scale, alpha, a, b,
  };
}

export function syntheticAdapter(modules: ReadonlyMap<string, LoraModule>, baseModel: string | null, rank: number): LoraAdapter {
  const config: LoraConfig = {
    peftType: 'LORA', r: rank, loraAlpha: 2 * rank, useRslora: false, targetModules: [...new Set([...modules.values()].map((m) => m.module))],
    rankPattern: {}, alphaPattern: {}, fanInFanOut: false, layersToTransform: null, modulesToSave: null, bias: 'none',
    baseModelNameOrPath: baseModel, raw: {},
  };
  const sorted = new Map([...modules.entries()].sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0)));
  return { source: '', config, modules: sorted, passthrough: [], sourceDtype: 'F32', flags: [] };
}
