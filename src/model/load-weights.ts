/**
 * Load Llama-family weights from model.safetensors or a sharded set (model.safetensors.index.json).
 * Matmul weights stay in their stored dtype (f32, bf16, f16) as WeightMatrix; norm weights and biases
 * are widened to f32 (they are tiny). Every expected tensor is checked for presence, dtype and shape.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { openSafetensors } from '../io/safetensors.js';
import type { SafetensorsFile } from '../io/safetensors-types.js';
import { alignedBytes, alignedViews } from '../tensor/aligned-views.js';
import { WEIGHT_DTYPE_BYTES, type WeightDtype } from '../tensor/dtype.js';
import type { WeightMatrix } from '../tensor/weight-matrix.js';
import { weightMatrix } from '../tensor/weight-matrix.js';
import type { LlamaConfig } from './llama-config.js';

/** One linear layer: y = x · weightᵀ (+ bias). weight: [N, K]; bias: [N] or null. */
export interface LinearWeights {
  readonly weight: WeightMatrix;
  readonly bias: Float32Array | null;
}

/** One decoder layer's weights. */
export interface LayerWeights {
  /** [dModel] */
  readonly inputNorm: Float32Array;
  /** [H·D, dModel] */
  readonly q: LinearWeights;
  /** [Hkv·D, dModel] */
  readonly k: LinearWeights;
  /** [Hkv·D, dModel] */
  readonly v: LinearWeights;
  /** [dModel, H·D] */
  readonly o: LinearWeights;
  /** [dModel] */
  readonly postAttentionNorm: Float32Array;
  /** [dFfn, dModel] */
  readonly gate: LinearWeights;
  /** [dFfn, dModel] */
  readonly up: LinearWeights;
  /** [dModel, dFfn] */
  readonly down: LinearWeights;
}

/** All weights of a Llama-family decoder. */
export interface LlamaWeights {
  /** [vocab, dModel] */
  readonly embedding: WeightMatrix;
  readonly layers: readonly LayerWeights[];
  /** [dModel] */
  readonly finalNorm: Float32Array;
  /** [vocab, dModel]; the same object as `embedding` when tied. */
  readonly lmHead: WeightMatrix;
}

/** One tensor the loader expects. */
export interface ExpectedTensor {
  readonly name: string;
  readonly shape: readonly number[];
  /** matrix: kept in stored dtype; vector: widened to f32. */
  readonly kind: 'matrix' | 'vector';
}

/** Every tensor a checkpoint of this config must hold, in HF naming. */
export function expectedTensors(config: LlamaConfig): ExpectedTensor[] {
  const { hiddenSize: dModel, intermediateSize: dFfn, numHeads, numKvHeads, headDim, vocabSize } = config;
  const list: ExpectedTensor[] = [{ name: 'model.embed_tokens.weight', shape: [vocabSize, dModel], kind: 'matrix' }];
  const linear = (name: string, n: number, k: number, bias: boolean): void => {
    list.push({ name: `${name}.weight`, shape: [n, k], kind: 'matrix' });
    if (bias) list.push({ name: `${name}.bias`, shape: [n], kind: 'vector' });
  };
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    list.push({ name: `${p}.input_layernorm.weight`, shape: [dModel], kind: 'vector' });
    linear(`${p}.self_attn.q_proj`, numHeads * headDim, dModel, config.qkvBias);
    linear(`${p}.self_attn.k_proj`, numKvHeads * headDim, dModel, config.qkvBias);
    linear(`${p}.self_attn.v_proj`, numKvHeads * headDim, dModel, config.qkvBias);
    linear(`${p}.self_attn.o_proj`, dModel, numHeads * headDim, config.oBias);
    list.push({ name: `${p}.post_attention_layernorm.weight`, shape: [dModel], kind: 'vector' });
    linear(`${p}.mlp.gate_proj`, dFfn, dModel, config.mlpBias);
    linear(`${p}.mlp.up_proj`, dFfn, dModel, config.mlpBias);
    linear(`${p}.mlp.down_proj`, dModel, dFfn, config.mlpBias);
  }
  list.push({ name: 'model.norm.weight', shape: [dModel], kind: 'vector' });
  if (!config.tieWordEmbeddings) list.push({ name: 'lm_head.weight', shape: [vocabSize, dModel], kind: 'matrix' });
  return list;
}

const WEIGHT_DTYPES: Readonly<Record<string, WeightDtype>> = { F32: 'f32', BF16: 'bf16', F16: 'f16' };

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

/** tensor name → file, from the shard index or the single file. */
async function locateTensors(modelDir: string): Promise<{ files: string[]; fileOf: (name: string) => string | undefined }> {
  const indexFile = join(modelDir, 'model.safetensors.index.json');
  if (await exists(indexFile)) {
    let index: unknown;
    try {
      index = JSON.parse(await readFile(indexFile, 'utf8'));
    } catch (e) {
      throw new SoppuError('MODEL_WEIGHTS', `shard index ${indexFile} is not valid JSON: ${(e as Error).message}`, { file: indexFile }, { cause: e });
    }
    const weightMap = (index as { weight_map?: unknown } | null)?.weight_map;
    if (weightMap === null || typeof weightMap !== 'object' || Array.isArray(weightMap)) {
      throw new SoppuError('MODEL_WEIGHTS', `shard index ${indexFile}: field "weight_map" must be an object`, { file: indexFile, field: 'weight_map' });
    }
    const map = new Map<string, string>();
    for (const [name, shard] of Object.entries(weightMap as Record<string, unknown>)) {
      if (typeof shard !== 'string' || shard.includes('/') || shard.includes('\\') || shard.startsWith('.')) {
        throw new SoppuError('MODEL_WEIGHTS', `shard index ${indexFile}: weight_map["${name}"] must be a plain file name in the model folder (got ${JSON.stringify(shard)})`, { file: indexFile, tensor: name });
      }
      map.set(name, join(modelDir, shard));
    }
    return { files: [...new Set(map.values())].sort(), fileOf: (name) => map.get(name) };
  }
  const single = join(modelDir, 'model.safetensors');
  if (!(await exists(single))) {
    throw new SoppuError('FILE_NOT_FOUND', `no model weights in ${modelDir}: expected model.safetensors or model.safetensors.index.json`, { file: single });
  }
  return { files: [single], fileOf: () => single };
}

/** How loadLlamaWeights places the matrices. */
export interface LoadWeightsOptions {
  /**
   * Memory for the matrices (a buffer of `bytes`, zeroed and not yet touched), such as the addon's huge-page
   * buffer; default a plain ArrayBuffer.
   */
  readonly allocate?: (bytes: number) => ArrayBuffer;
  /** The most bytes one buffer holds (default 1 GiB): matrices fill buffers in order; a larger matrix gets its own. */
  readonly maxBufferBytes?: number;
}

const DEFAULT_MAX_BUFFER_BYTES = 2 ** 30;

/**
 * Load and check every weight of `config` from `modelDir`. The matrices share buffers from `options.allocate`
 * (one for a small model), each a view at its own aligned offset: a step then reads a few large mappings.
 */
export async function loadLlamaWeights(modelDir: string, config: LlamaConfig, options: LoadWeightsOptions = {}): Promise<LlamaWeights> {
  const { files, fileOf } = await locateTensors(modelDir);
  const opened = new Map<string, SafetensorsFile>();
  try {
    for (const file of files) opened.set(file, await openSafetensors(file));
    const matrices = new Map<string, WeightMatrix>();
    const vectors = new Map<string, Float32Array>();
    const maxBufferBytes = options.maxBufferBytes ?? DEFAULT_MAX_BUFFER_BYTES;
    // the matrices in file order, each with the buffer it goes in; bufferBytes[b]: buffer b's size
    const pending: { expected: ExpectedTensor; st: SafetensorsFile; dtype: WeightDtype; bytes: number; buffer: number }[] = [];
    const bufferBytes: number[] = [];
    for (const expected of expectedTensors(config)) {
      const file = fileOf(expected.name);
      const st = file === undefined ? undefined : opened.get(file);
      const info = st?.get(expected.name);
      const shapeText = `[${expected.shape.join(', ')}]`;
      if (!st || !info) {
        throw new SoppuError('MODEL_WEIGHTS', `tensor ${expected.name} (expected shape ${shapeText}) is missing from ${file ?? modelDir}`, { file: file ?? modelDir, tensor: expected.name, limit: shapeText });
      }
      if (info.shape.length !== expected.shape.length || info.shape.some((d, i) => d !== expected.shape[i])) {
        throw new SoppuError('MODEL_WEIGHTS', `tensor ${expected.name} in ${st.path} has shape [${info.shape.join(', ')}], expected ${shapeText}`, { file: st.path, tensor: expected.name, limit: shapeText });
      }
      const dtype = WEIGHT_DTYPES[info.dtype];
      if (!dtype) {
        throw new SoppuError('MODEL_WEIGHTS', `tensor ${expected.name} in ${st.path} has dtype ${info.dtype}; supported: F32, BF16, F16`, { file: st.path, tensor: expected.name, limit: 'F32, BF16, F16' });
      }
      if (expected.kind === 'vector') {
        vectors.set(expected.name, await st.readF32(expected.name));
      } else {
        const bytes = info.dataOffsets[1] - info.dataOffsets[0];
        const last = bufferBytes.length - 1;
        if (last < 0 || bufferBytes[last]! + alignedBytes(bytes) > maxBufferBytes) bufferBytes.push(0);
        const buffer = bufferBytes.length - 1;
        pending.push({ expected, st, dtype, bytes, buffer });
        bufferBytes[buffer]! += alignedBytes(bytes);
      }
    }
    // views handed out in the order the sizes were summed
    const views = bufferBytes.map((bytes) => alignedViews(options.allocate ? options.allocate(bytes) : new ArrayBuffer(bytes)));
    for (const { expected, st, dtype, bytes, buffer } of pending) {
      const data = views[buffer]!(dtype, bytes / WEIGHT_DTYPE_BYTES[dtype]);
      await st.readInto(expected.name, new Uint8Array(data.buffer, data.byteOffset, bytes));
      matrices.set(expected.name, weightMatrix(dtype, expected.shape[0]!, expected.shape[1]!, data));
    }
    const matrix = (name: string): WeightMatrix => matrices.get(name)!;
    const vector = (name: string): Float32Array => vectors.get(name)!;
    const linear = (name: string, bias: boolean): LinearWeights => ({ weight: matrix(`${name}.weight`), bias: bias ? vector(`${name}.bias`) : null });
    const layers: LayerWeights[] = [];
    for (let l = 0; l < config.numLayers; l++) {
      const p = `model.layers.${l}`;
      layers.push({
        inputNorm: vector(`${p}.input_layernorm.weight`),
        q: linear(`${p}.self_attn.q_proj`, config.qkvBias),
        k: linear(`${p}.self_attn.k_proj`, config.qkvBias),
        v: linear(`${p}.self_attn.v_proj`, config.qkvBias),
        o: linear(`${p}.self_attn.o_proj`, config.oBias),
        postAttentionNorm: vector(`${p}.post_attention_layernorm.weight`),
        gate: linear(`${p}.mlp.gate_proj`, config.mlpBias),
        up: linear(`${p}.mlp.up_proj`, config.mlpBias),
        down: linear(`${p}.mlp.down_proj`, config.mlpBias),
      });
    }
    const embedding = matrix('model.embed_tokens.weight');
    return {
      embedding,
      layers,
      finalNorm: vector('model.norm.weight'),
      lmHead: config.tieWordEmbeddings ? embedding : matrix('lm_head.weight'),
    };
  } finally {
    for (const st of opened.values()) await st.close();
  }
}
