/**
 * Plain-data summaries of an adapter and of a safetensors file (what `soppu inspect` prints).
 * snake_case, since they are printed as JSON.
 */
import { ST_DTYPE_BYTES } from '../tensor/dtype.js';
import { frobeniusNormOfDelta } from './frobenius-norm-of-delta.js';
import type { LoraAdapter } from './lora-types.js';
import type { SafetensorsFile } from './safetensors-types.js';

export interface AdapterModuleSummary {
  readonly path: string;
  readonly layer: number;
  readonly module: string;
  readonly rank: number;
  readonly in_features: number;
  readonly out_features: number;
  readonly alpha: number;
  readonly scale: number;
  /** ‖scale·B·A‖_F */
  readonly delta_norm: number;
}

export interface AdapterSummary {
  readonly kind: 'adapter';
  readonly source: string;
  readonly base_model: string | null;
  readonly peft_type: 'LORA';
  readonly r: number;
  readonly lora_alpha: number;
  readonly use_rslora: boolean;
  readonly target_modules: readonly string[] | string;
  readonly dtype: string;
  readonly flags: readonly string[];
  /** LoRA factor parameters: Σ r·(in + out). */
  readonly parameter_count: number;
  readonly ranks: readonly number[];
  readonly modules: readonly AdapterModuleSummary[];
  readonly passthrough: ReadonlyArray<{ readonly name: string; readonly dtype: string; readonly shape: readonly number[] }>;
}

export interface SafetensorsSummary {
  readonly kind: 'safetensors';
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensor_count: number;
  readonly data_bytes: number;
  readonly tensors: ReadonlyArray<{ readonly name: string; readonly dtype: string; readonly shape: readonly number[]; readonly data_offsets: readonly [number, number] }>;
}

export function describeAdapter(adapter: LoraAdapter): AdapterSummary {
  const modules = [...adapter.modules.values()];
  return {
    kind: 'adapter',
    source: adapter.source,
    base_model: adapter.config.baseModelNameOrPath,
    peft_type: 'LORA',
    r: adapter.config.r,
    lora_alpha: adapter.config.loraAlpha,
    use_rslora: adapter.config.useRslora,
    target_modules: adapter.config.targetModules,
    dtype: adapter.sourceDtype,
    flags: adapter.flags,
    parameter_count: modules.reduce((sum, m) => sum + m.rank * (m.inFeatures + m.outFeatures), 0),
    ranks: [...new Set(modules.map((m) => m.rank))].sort((x, y) => x - y),
    modules: modules.map((m) => ({
      path: m.path,
      layer: m.layer,
      module: m.module,
      rank: m.rank,
      in_features: m.inFeatures,
      out_features: m.outFeatures,
      alpha: m.alpha,
      scale: m.scale,
      delta_norm: frobeniusNormOfDelta(m),
    })),
    passthrough: adapter.passthrough.map((p) => ({ name: p.name, dtype: p.dtype, shape: p.shape })),
  };
}

export function describeSafetensors(file: SafetensorsFile): SafetensorsSummary {
  return {
    kind: 'safetensors',
    path: file.path,
    metadata: file.metadata,
    tensor_count: file.tensors.length,
    data_bytes: file.tensors.reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1) * ST_DTYPE_BYTES[t.dtype], 0),
    tensors: file.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, data_offsets: t.dataOffsets })),
  };
}
