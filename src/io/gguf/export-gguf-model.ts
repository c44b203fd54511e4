/**
 * Export a Hugging Face Llama-family model directory (config.json, model.safetensors or shards,
 * tokenizer.json) to one GGUF file llama.cpp loads: llama architecture metadata, the gpt2 (byte-level
 * BPE) vocabulary, and the weights under GGUF names with q/k rows permuted for GGML's rope.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../../errors/soppu-error.js';
import { bf16ArrayToF32, f16ArrayToF32, narrowFinite } from '../../tensor/dtype.js';
import type { LlamaConfig } from '../../model/llama-config.js';
import { loadLlamaConfig } from '../../model/llama-config.js';
import { openSafetensors } from '../safetensors.js';
import type { SafetensorsFile } from '../safetensors-types.js';
import { ggufTokenizerMetadata } from './gguf-tokenizer-metadata.js';
import type { GgmlTypeName, GgufTensor, GgufValue } from './gguf-writer.js';
import { writeGguf } from './gguf-writer.js';
import { permuteRopeRows } from './permute-rope-rows.js';

export type GgufOutputType = 'f32' | 'f16' | 'bf16';

export interface ExportGgufModelOptions {
  readonly modelDir: string;
  readonly out: string;
  /** Type of the matrices (norms are always f32); default: the stored dtype. */
  readonly type?: GgufOutputType;
  /** general.name (default: the directory's last component). */
  readonly name?: string;
}

export interface ExportedGguf {
  readonly path: string;
  readonly bytes: number;
  readonly tensors: number;
  readonly type: GgufOutputType;
}

/** llama.cpp general.file_type (llama_ftype) for an all-`type` file. */
const FILE_TYPE: Readonly<Record<GgufOutputType, number>> = { f32: 0, f16: 1, bf16: 32 };
const GGML_OF: Readonly<Record<GgufOutputType, GgmlTypeName>> = { f32: 'F32', f16: 'F16', bf16: 'BF16' };

/** HF module name → GGUF tensor stem inside blk.N. */
export const GGUF_MODULE_NAMES: Readonly<Record<string, string>> = {
  'self_attn.q_proj': 'attn_q',
  'self_attn.k_proj': 'attn_k',
  'self_attn.v_proj': 'attn_v',
  'self_attn.o_proj': 'attn_output',
  'mlp.gate_proj': 'ffn_gate',
  'mlp.up_proj': 'ffn_up',
  'mlp.down_proj': 'ffn_down',
  input_layernorm: 'attn_norm',
  post_attention_layernorm: 'ffn_norm',
};

/** Refuses what the llama GGUF layout cannot express (biases, rope scaling, other architectures). */
export function checkGgufExportable(config: LlamaConfig, file: string): void {
  const refuse = (field: string, why: string): never => {
    throw new SoppuError('MODEL_CONFIG', `${file}: field "${field}": ${why} (GGUF export supports the llama architecture without biases or rope scaling)`, { file, field });
  };
  if (config.architecture === 'qwen2') refuse('architectures', 'Qwen2 is not exported');
  if (config.qkvBias || config.oBias || config.mlpBias) refuse('attention_bias', 'linear biases are not exported');
  if (config.ropeScaling) refuse('rope_scaling', 'rope scaling is not exported');
}

/** The llama.* and general.* metadata of a model. */
export function llamaGgufMetadata(config: LlamaConfig, name: string, type: GgufOutputType): Map<string, GgufValue> {
  const m = new Map<string, GgufValue>();
  m.set('general.architecture', { type: 'string', value: 'llama' });
  m.set('general.type', { type: 'string', value: 'model' });
  m.set('general.name', { type: 'string', value: name });
  m.set('general.file_type', { type: 'uint32', value: FILE_TYPE[type] });
  m.set('general.alignment', { type: 'uint32', value: 32 });
  m.set('llama.vocab_size', { type: 'uint32', value: config.vocabSize });
  m.set('llama.context_length', { type: 'uint32', value: config.maxPositionEmbeddings });
  m.set('llama.embedding_length', { type: 'uint32', value: config.hiddenSize });
  m.set('llama.block_count', { type: 'uint32', value: config.numLayers });
  m.set('llama.feed_forward_length', { type: 'uint32', value: config.intermediateSize });
  m.set('llama.attention.head_count', { type: 'uint32', value: config.numHeads });
  m.set('llama.attention.head_count_kv', { type: 'uint32', value: config.numKvHeads });
  m.set('llama.attention.key_length', { type: 'uint32', value: config.headDim });
  m.set('llama.attention.value_length', { type: 'uint32', value: config.headDim });
  m.set('llama.rope.freq_base', { type: 'float32', value: config.ropeTheta });
  m.set('llama.rope.dimension_count', { type: 'uint32', value: config.headDim });
  m.set('llama.attention.layer_norm_rms_epsilon', { type: 'float32', value: config.rmsNormEps });
  return m;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** Opens the model's safetensors (single file or shards); returns a tensor → file lookup. */
async function openWeights(modelDir: string): Promise<{ fileOf: (name: string) => SafetensorsFile; close: () => Promise<void> }> {
  const indexFile = join(modelDir, 'model.safetensors.index.json');
  const files = new Map<string, SafetensorsFile>();
  const opened: SafetensorsFile[] = [];
  const close = async (): Promise<void> => {
    for (const f of opened) await f.close();
  };
  try {
    if (await exists(indexFile)) {
      let index: unknown;
      try {
        index = JSON.parse(await readFile(indexFile, 'utf8'));
      } catch (e) {
        throw new SoppuError('MODEL_WEIGHTS', `${indexFile}: not valid JSON (${(e as Error).message})`, { file: indexFile });
      }
      const weightMap = (index as { weight_map?: unknown } | null)?.weight_map;
      if (weightMap === null || typeof weightMap !== 'object' || Array.isArray(weightMap)) throw new SoppuError('MODEL_WEIGHTS', `${indexFile}: field "weight_map" must be an object`, { file: indexFile, field: 'weight_map' });
      const byShard = new Map<string, SafetensorsFile>();
      for (const [tensor, shard] of Object.entries(weightMap as Record<string, unknown>)) {
        if (typeof shard !== 'string' || shard.includes('/') || shard.includes('\\') || shard.startsWith('.')) {
          throw new SoppuError('MODEL_WEIGHTS', `${indexFile}: weight_map["${tensor}"] must be a plain file name in the model folder`, { file: indexFile, tensor });
        }
        let file = byShard.get(shard);
        if (!file) {
          file = await openSafetensors(join(modelDir, shard));
          opened.push(file);
          byShard.set(shard, file);
        }
        files.set(tensor, file);
      }
    } else {
      const single = join(modelDir, 'model.safetensors');
      if (!(await exists(single))) throw new SoppuError('FILE_NOT_FOUND', `no model weights in ${modelDir}: expected model.safetensors or model.safetensors.index.json`, { file: single });
      const file = await openSafetensors(single);
      opened.push(file);
      for (const info of file.tensors) files.set(info.name, file);
    }
  } catch (e) {
    await close();
    throw e;
  }
  const fileOf = (name: string): SafetensorsFile => {
    const file = files.get(name);
    if (!file || !file.get(name)) throw new SoppuError('MODEL_WEIGHTS', `${modelDir}: tensor "${name}" is missing from the model weights`, { file: modelDir, tensor: name });
    return file;
  };
  return { fileOf, close };
}

/** Reads a tensor, checks its shape, converts it to `type`. */
async function readAs(weights: { fileOf: (name: string) => SafetensorsFile }, name: string, shape: readonly number[], type: GgufOutputType): Promise<Float32Array | Uint16Array> {
  const file = weights.fileOf(name);
  const info = file.get(name)!;
  if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
    throw new SoppuError('MODEL_WEIGHTS', `${file.path}: tensor "${name}" has shape [${info.shape.join(', ')}], expected [${shape.join(', ')}]`, { file: file.path, tensor: name });
  }
  if (info.dtype !== 'F32' && info.dtype !== 'F16' && info.dtype !== 'BF16') {
    throw new SoppuError('SAFETENSORS_DTYPE', `${file.path}: tensor "${name}" has dtype ${info.dtype} (GGUF export reads F32, F16, BF16)`, { file: file.path, tensor: name });
  }
  const data = await file.read(name);
  const stored: GgufOutputType = info.dtype === 'F32' ? 'f32' : info.dtype === 'F16' ? 'f16' : 'bf16';
  if (stored === type) return data as Float32Array | Uint16Array;
  const wide = stored === 'f32' ? (data as Float32Array) : stored === 'f16' ? f16ArrayToF32(data as Uint16Array) : bf16ArrayToF32(data as Uint16Array);
  if (type === 'f32') return wide;
  // a weight past the narrow type's range would be written as ±Infinity
  const narrowed = narrowFinite(wide, type);
  if ('overflowAt' in narrowed) {
    throw new SoppuError(
      'MODEL_WEIGHTS',
      `${file.path}: tensor "${name}" element ${narrowed.overflowAt} is ${wide[narrowed.overflowAt]!}, outside ${type}'s range: export with --type ${type === 'f16' ? 'bf16 or f32' : 'f32'}`,
      { file: file.path, tensor: name, field: 'type' },
    );
  }
  return narrowed.bits;
}

/** Export `modelDir` to a GGUF file. */
export async function exportGgufModel(options: ExportGgufModelOptions): Promise<ExportedGguf> {
  const configFile = join(options.modelDir, 'config.json');
  const config = await loadLlamaConfig(options.modelDir);
  checkGgufExportable(config, configFile);
  const weights = await openWeights(options.modelDir);
  try {
    const storedDtype = weights.fileOf('model.embed_tokens.weight').get('model.embed_tokens.weight')!.dtype;
    const type: GgufOutputType = options.type ?? (storedDtype === 'BF16' ? 'bf16' : storedDtype === 'F16' ? 'f16' : 'f32');
    const name = options.name ?? (options.modelDir.replace(/[\\/]+$/, '').split(/[\\/]/).pop() || 'model');
    const metadata = llamaGgufMetadata(config, name, type);
    for (const [key, value] of await ggufTokenizerMetadata(options.modelDir, config.vocabSize, { bosTokenId: config.bosTokenId, eosTokenIds: config.eosTokenIds })) metadata.set(key, value);

    const { hiddenSize: dModel, intermediateSize: dFfn, numHeads, numKvHeads, headDim, vocabSize } = config;
    const tensors: GgufTensor[] = [];
    const matrix = async (hfName: string, ggufName: string, shape: [number, number], permuteHeads = 0): Promise<void> => {
      let data = await readAs(weights, hfName, shape, type);
      if (permuteHeads > 0) data = permuteRopeRows(data, shape[0], shape[1], permuteHeads, hfName);
      tensors.push({ name: ggufName, type: GGML_OF[type], shape, data });
    };
    const vector = async (hfName: string, ggufName: string, length: number): Promise<void> => {
      tensors.push({ name: ggufName, type: 'F32', shape: [length], data: (await readAs(weights, hfName, [length], 'f32')) as Float32Array });
    };
    await matrix('model.embed_tokens.weight', 'token_embd.weight', [vocabSize, dModel]);
    for (let l = 0; l < config.numLayers; l++) {
      const p = `model.layers.${l}`;
      const b = `blk.${l}`;
      await vector(`${p}.input_layernorm.weight`, `${b}.attn_norm.weight`, dModel);
      await matrix(`${p}.self_attn.q_proj.weight`, `${b}.attn_q.weight`, [numHeads * headDim, dModel], numHeads);
      await matrix(`${p}.self_attn.k_proj.weight`, `${b}.attn_k.weight`, [numKvHeads * headDim, dModel], numKvHeads);
      await matrix(`${p}.self_attn.v_proj.weight`, `${b}.attn_v.weight`, [numKvHeads * headDim, dModel]);
      await matrix(`${p}.self_attn.o_proj.weight`, `${b}.attn_output.weight`, [dModel, numHeads * headDim]);
      await vector(`${p}.post_attention_layernorm.weight`, `${b}.ffn_norm.weight`, dModel);
      await matrix(`${p}.mlp.gate_proj.weight`, `${b}.ffn_gate.weight`, [dFfn, dModel]);
      await matrix(`${p}.mlp.up_proj.weight`, `${b}.ffn_up.weight`, [dFfn, dModel]);
      await matrix(`${p}.mlp.down_proj.weight`, `${b}.ffn_down.weight`, [dModel, dFfn]);
    }
    await vector('model.norm.weight', 'output_norm.weight', dModel);
    // tied: llama.cpp falls back to token_embd.weight when output.weight is absent
    if (!config.tieWordEmbeddings) await matrix('lm_head.weight', 'output.weight', [vocabSize, dModel]);
    const bytes = await writeGguf(options.out, metadata, tensors);
    return { path: options.out, bytes, tensors: tensors.length, type };
  } finally {
    await weights.close();
  }
}
