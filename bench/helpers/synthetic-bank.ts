/**
 * An in-memory bank with the compressor's shapes, for benchmarks: per cluster and slot U [out, R] and
 * Vᵀ [R, in]; per adapter a full R×R core. Adapter i is `${idPrefix}${i}` (4 digits), in cluster i mod clusters.
 * Values are seeded normals (they do not affect speed).
 */
import type { BankAdapterParts, BankReader, BankSlotPart, SharedBases } from '../../src/compress/bank-reader-types.js';
import { deriveSeed } from '../../src/compress/fit-slot.js';
import { slotShapeOf } from '../../src/engine/engine.js';
import type { TargetModule } from '../../src/model/adapter-hook.js';
import type { LlamaConfig } from '../../src/model/llama-config.js';
import { Random } from '../../src/tensor/random.js';

export interface SyntheticBankOptions {
  readonly targets: readonly TargetModule[];
  readonly sharedRank: number;
  readonly clusters: number;
  readonly bankSize: number;
  /** Adapter ids are this prefix and the index in 4 digits ("u0007", "user-0007"). */
  readonly idPrefix: string;
}

/** The id of adapter `index` of a synthetic bank. */
export function syntheticBankId(idPrefix: string, index: number): string {
  return `${idPrefix}${String(index).padStart(4, '0')}`;
}

export function syntheticBank(config: LlamaConfig, options: SyntheticBankOptions): BankReader {
  const shape = slotShapeOf(config);
  const R = options.sharedRank;
  const slots: { path: string; layer: number; module: TargetModule }[] = [];
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const module of options.targets) {
      const block = ['gate_proj', 'up_proj', 'down_proj'].includes(module) ? 'mlp' : 'self_attn';
      slots.push({ path: `model.layers.${layer}.${block}.${module}`, layer, module });
    }
  }
  // made on each load from the key's own seed, and not kept: a bank on disk holds no copy in memory either (the
  // adapter cache keeps the one it loads), and a kept copy counted against compressed in the RSS figure
  const basesOf = (key: string): SharedBases => {
    const random = new Random(deriveSeed(5, key));
    const path = key.slice(key.indexOf('/') + 1);
    const slot = slots.find((s) => s.path === path)!;
    const { inFeatures, outFeatures } = shape(slot.layer, slot.module)!;
    return {
      key,
      path: key,
      rank: R,
      inFeatures,
      outFeatures,
      u: random.fillNormal(new Float32Array(outFeatures * R), 1 / Math.sqrt(outFeatures)),
      vt: random.fillNormal(new Float32Array(R * inFeatures), 1 / Math.sqrt(inFeatures)),
      bytes: (outFeatures + inFeatures) * R * 4,
    };
  };
  const ids = Array.from({ length: options.bankSize }, (_, i) => syntheticBankId(options.idPrefix, i));
  const idSet = new Set(ids);
  return {
    dir: 'memory:synthetic-bank',
    baseModel: null,
    ids: () => ids,
    has: (id) => idSet.has(id),
    async loadAdapter(id): Promise<BankAdapterParts> {
      const index = Number(id.slice(options.idPrefix.length));
      const cluster = index % options.clusters;
      const adapterRandom = new Random(1000 + index);
      const parts = new Map<string, BankSlotPart>();
      for (const slot of slots) {
        const core = adapterRandom.fillNormal(new Float32Array(R * R), 0.01);
        parts.set(slot.path, { kind: 'compressed', path: slot.path, basesKey: `c${cluster}/${slot.path}`, rank: R, diagonal: false, core });
      }
      return { id, cluster, slots: parts, bytes: slots.length * R * R * 4 };
    },
    async loadBases(key) {
      return basesOf(key);
    },
  };
}
