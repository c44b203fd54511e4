/**
 * Saves a LoraAdapter in the standard PEFT layout (adapter_config.json + adapter_model.safetensors,
 * keys `base_model.model.<path>.lora_A.weight` / `.lora_B.weight`) that PEFT, LoRAX and vLLM load.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { F16_MAX, narrowFinite, type StDtype, type WeightDtype } from '../tensor/dtype.js';
import { ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE } from './load-lora-adapter.js';
import { loraScale, moduleTargeting } from './lora-config.js';
import type { LoraAdapter, LoraConfig, LoraModule } from './lora-types.js';
import type { TensorData, TensorToWrite } from './safetensors-types.js';
import { tensorDataFromBytes, writeFileAtomic, writeSafetensors } from './safetensors.js';

export interface SaveLoraAdapterOptions {
  /** dtype of the factors in the file (default f32). */
  readonly dtype?: WeightDtype;
  /** Test knob: write keys with the doubled prefix `base_model.model.base_model.model.`. */
  readonly doubledPrefix?: boolean;
  /** Test knob: insert an adapter name into keys (`.lora_A.default.weight`). */
  readonly adapterName?: string;
  /** Test knob: store factors transposed (A [in, r], B [r, out]) as some Conv1D exporters do. */
  readonly transposeFactors?: boolean;
}

const ST_DTYPE_OF: Readonly<Record<WeightDtype, StDtype>> = { f32: 'F32', bf16: 'BF16', f16: 'F16' };

/** The most frequent value (ties → the smallest). */
function mode(values: readonly number[]): number {
  const counts = new Map<number, number>();
  for (const v of values) counts.set(v, (counts.get(v) ?? 0) + 1);
  let best = values[0]!;
  for (const [v, c] of counts) if (c > counts.get(best)! || (c === counts.get(best)! && v < best)) best = v;
  return best;
}

/**
 * rank_pattern / alpha_pattern key for one module: the path without its first component
 * ("layers.3.self_attn.q_proj"), which both the old PEFT rule (".*\.{key}$") and the new one
 * ("(.*\.)?({key})$") match against exactly this module.
 */
export function patternKeyOfPath(path: string): string {
  const dot = path.indexOf('.');
  return dot < 0 ? path : path.slice(dot + 1);
}

/** alpha that reproduces `module.scale` at its rank (module.alpha when consistent). */
function effectiveAlpha(module: LoraModule, useRslora: boolean): number {
  const fromAlpha = loraScale(module.alpha, module.rank, useRslora);
  if (Math.abs(fromAlpha - module.scale) <= 1e-6 * Math.max(1, Math.abs(module.scale))) return module.alpha;
  return module.scale * (useRslora ? Math.sqrt(module.rank) : module.rank);
}

function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(src.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[r * cols + c]!;
  return out;
}

/** `data` in `dtype`; refuses values the dtype cannot hold (they would be written as ±Infinity). */
function convert(data: Float32Array, dtype: WeightDtype, tensor: string, file: string): TensorData {
  if (dtype === 'f32') return data;
  const narrowed = narrowFinite(data, dtype);
  if ('bits' in narrowed) return narrowed.bits;
  const i = narrowed.overflowAt;
  if (dtype === 'bf16') throw new SoppuError('ADAPTER_TENSORS', `${file}: tensor "${tensor}": value ${data[i]} at element ${i} is beyond the bf16 range; save as f32`, { file, tensor, field: 'dtype' });
  throw new SoppuError('ADAPTER_TENSORS', `${file}: tensor "${tensor}": value ${data[i]} at element ${i} is beyond the f16 range (±${F16_MAX}); save as f32 or bf16`, {
    file, tensor, field: 'dtype', limit: F16_MAX,
  });
}

/** The adapter_config.json object for `adapter` (keys sorted, as PEFT writes them). */
export function adapterConfigJson(adapter: LoraAdapter): Record<string, unknown> {
  const modules = [...adapter.modules.values()];
  if (modules.length === 0) throw new SoppuError('ADAPTER_TENSORS', `${adapter.source || '<memory>'}: adapter has no modules to save`, { file: adapter.source });
  const useRslora = adapter.config.useRslora;
  const alphas = modules.map((m) => effectiveAlpha(m, useRslora));
  const r = mode(modules.map((m) => m.rank));
  const loraAlpha = mode(alphas);
  const rankPattern: Record<string, number> = {};
  const alphaPattern: Record<string, number> = {};
  modules.forEach((m, i) => {
    if (m.rank !== r) rankPattern[patternKeyOfPath(m.path)] = m.rank;
    if (alphas[i] !== loraAlpha) alphaPattern[patternKeyOfPath(m.path)] = alphas[i]!;
  });
  const config = adapter.config;
  const targetModules = [...new Set(modules.map((m) => m.module))].sort();
  // layers_to_transform narrows a list of targets only (PEFT): one that came with a regex
  // target_modules would drop modules from the list written here, so it is kept only if none drops.
  const listConfig: LoraConfig = { ...config, targetModules, excludeModules: null };
  const keepLayers = modules.every((m) => moduleTargeting(listConfig, m.path).targeted);
  const json: Record<string, unknown> = {
    task_type: 'CAUSAL_LM',
    inference_mode: true,
    ...config.raw,
    peft_type: 'LORA',
    r,
    lora_alpha: loraAlpha,
    use_rslora: useRslora,
    use_dora: false,
    target_modules: targetModules,
    rank_pattern: rankPattern,
    alpha_pattern: alphaPattern,
    fan_in_fan_out: config.fanInFanOut,
    layers_to_transform: keepLayers ? config.layersToTransform : null,
    ...(keepLayers ? {} : { layers_pattern: null }),
    modules_to_save: config.modulesToSave,
    bias: config.bias,
    base_model_name_or_path: config.baseModelNameOrPath,
  };
  // the factors written are final: an init that PEFT would re-run, or that leaves modules these target_modules
  // widen to with random factors (false), does not belong to them (PEFT's default gives such modules B = 0)
  delete json['init_lora_weights'];
  return Object.fromEntries(Object.keys(json).sort().map((k) => [k, json[k]]));
}

/**
 * Writes `adapter` to `dir` (created if needed): adapter_config.json and adapter_model.safetensors,
 * each atomically. Factors are written canonical (A [r, in], B [out, r], B unscaled) in `dtype`;
 * passthrough tensors are written back byte for byte under their original names.
 */
export async function saveLoraAdapter(dir: string, adapter: LoraAdapter, options: SaveLoraAdapterOptions = {}): Promise<void> {
  const dtype = options.dtype ?? 'f32';
  const stDtype = ST_DTYPE_OF[dtype];
  if (!stDtype) throw new SoppuError('CONFIG', `dtype ${JSON.stringify(dtype)} is not one of f32, bf16, f16`, { field: 'dtype' });
  const config = adapterConfigJson(adapter);
  const prefix = options.doubledPrefix ? 'base_model.model.base_model.model.' : 'base_model.model.';
  const name = options.adapterName ? `.${options.adapterName}` : '';
  const tensors: TensorToWrite[] = [];
  for (const m of adapter.modules.values()) {
    if (m.a.length !== m.rank * m.inFeatures || m.b.length !== m.outFeatures * m.rank) {
      throw new SoppuError('ADAPTER_TENSORS', `${dir}: module ${m.path}: A has ${m.a.length} and B ${m.b.length} elements, expected [${m.rank}, ${m.inFeatures}] and [${m.outFeatures}, ${m.rank}]`, { file: dir, tensor: m.path });
    }
    const a = options.transposeFactors ? transpose(m.a, m.rank, m.inFeatures) : m.a;
    const b = options.transposeFactors ? transpose(m.b, m.outFeatures, m.rank) : m.b;
    const aName = `${prefix}${m.path}.lora_A${name}.weight`;
    const bName = `${prefix}${m.path}.lora_B${name}.weight`;
    tensors.push({ name: aName, dtype: stDtype, shape: options.transposeFactors ? [m.inFeatures, m.rank] : [m.rank, m.inFeatures], data: convert(a, dtype, aName, dir) });
    tensors.push({ name: bName, dtype: stDtype, shape: options.transposeFactors ? [m.rank, m.outFeatures] : [m.outFeatures, m.rank], data: convert(b, dtype, bName, dir) });
  }
  for (const p of adapter.passthrough) tensors.push({ name: p.name, dtype: p.dtype, shape: p.shape, data: tensorDataFromBytes(p.dtype, p.bytes) });
  try {
    await mkdir(dir, { recursive: true });
  } catch (e) {
    throw new SoppuError('FILE_IO', `${dir}: cannot create directory (${(e as Error).message})`, { file: dir }, { cause: e });
  }
  await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors, { format: 'pt' });
  await writeFileAtomic(join(dir, ADAPTER_CONFIG_FILE), [new TextEncoder().encode(`${JSON.stringify(config, null, 2)}\n`)]);
}
