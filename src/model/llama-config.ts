/**
 * Llama-family model config (config.json of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).
 * Everything the forward pass and the weight loader need, validated, in camelCase.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import type { RopeScaling } from '../kernels/ref/rope-inv-freq.js';

export type { RopeScaling } from '../kernels/ref/rope-inv-freq.js';

/** The architecture families the forward pass implements. */
export type LlamaArchitecture = 'llama' | 'mistral' | 'qwen2';

const ARCHITECTURES: Readonly<Record<string, LlamaArchitecture>> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'mistral',
  Qwen2ForCausalLM: 'qwen2',
};

/** Parsed, validated config of a Llama-family decoder. */
export interface LlamaConfig {
  readonly architecture: LlamaArchitecture;
  /** HF `model_type` as written (llama, mistral, qwen2). */
  readonly modelType: string;
  /** dModel */
  readonly hiddenSize: number;
  /** dFfn */
  readonly intermediateSize: number;
  readonly numLayers: number;
  /** H */
  readonly numHeads: number;
  /** Hkv (grouped-query attention; equals H without GQA) */
  readonly numKvHeads: number;
  /** D: explicit `head_dim`, or hidden_size / num_attention_heads. */
  readonly headDim: number;
  readonly vocabSize: number;
  readonly rmsNormEps: number;
  readonly ropeTheta: number;
  /** Llama-3 rope scaling, or null. */
  readonly ropeScaling: RopeScaling | null;
  /**
   * Longest context the model supports here. For Mistral with a sliding window shorter than
   * max_position_embeddings this is the window (within it, full attention is exact).
   */
  readonly maxPositionEmbeddings: number;
  /** lm_head shares the embedding table. */
  readonly tieWordEmbeddings: boolean;
  /** q/k/v projections have biases (Qwen2; Llama with attention_bias). */
  readonly qkvBias: boolean;
  /** o_proj has a bias (Llama with attention_bias). */
  readonly oBias: boolean;
  /** gate/up/down have biases (Llama with mlp_bias). */
  readonly mlpBias: boolean;
  readonly bosTokenId: number | null;
  /** End-of-sequence ids (config.json may give one id or a list). */
  readonly eosTokenIds: readonly number[];
  /** `torch_dtype` as written (informational), or null. */
  readonly torchDtype: string | null;
}

type Json = Record<string, unknown>;

/** Read and parse `<dir>/config.json`. */
export async function loadLlamaConfig(modelDir: string): Promise<LlamaConfig> {
  const file = join(modelDir, 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    // missing, or there but unreadable (permissions): two different fixes
    const code = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'FILE_NOT_FOUND' : 'FILE_IO';
    throw new SoppuError(code, `model config ${file} could not be read: ${(e as Error).message}`, { file }, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new SoppuError('MODEL_CONFIG', `model config ${file} is not valid JSON: ${(e as Error).message}`, { file }, { cause: e });
  }
  return parseLlamaConfig(json, file);
}

/** Validate a parsed config.json object. `file` is only used in error messages. */
export function parseLlamaConfig(json: unknown, file = 'config.json'): LlamaConfig {
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new SoppuError('MODEL_CONFIG', `model config ${file} must be a JSON object`, { file });
  }
  const raw = json as Json;
  const fail = (field: string, message: string): never => {
    throw new SoppuError('MODEL_CONFIG', `model config ${file}: field "${field}" ${message}`, { file, field });
  };
  const positiveInt = (field: string, fallback?: number): number => {
    const value = raw[field] ?? fallback;
    if (value === undefined) return fail(field, 'is required');
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) return fail(field, `must be a positive integer (got ${JSON.stringify(value)})`);
    return value;
  };
  const positiveNumber = (field: string, fallback: number, source: Json = raw, prefix = ''): number => {
    const value = source[field] ?? fallback;
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) return fail(prefix + field, `must be a positive number (got ${JSON.stringify(value)})`);
    return value;
  };
  const optionalBool = (field: string, fallback: boolean): boolean => {
    const value = raw[field] ?? fallback;
    if (typeof value !== 'boolean') return fail(field, `must be a boolean (got ${JSON.stringify(value)})`);
    return value;
  };

  // architecture: `architectures` list first, `model_type` as the fallback
  const architectures = raw.architectures;
  let architecture: LlamaArchitecture | undefined;
  if (architectures !== undefined && architectures !== null) { // null is transformers' default: model_type decides
    if (!Array.isArray(architectures) || architectures.length === 0 || typeof architectures[0] !== 'string') {
      fail('architectures', 'must be a non-empty list of strings');
    }
    const name = (architectures as string[])[0]!;
    architecture = ARCHITECTURES[name];
    if (!architecture) fail('architectures', `names unsupported architecture "${name}" (supported: ${Object.keys(ARCHITECTURES).join(', ')})`);
  }
  const modelType = typeof raw.model_type === 'string' ? raw.model_type : (architecture ?? '');
  if (!architecture) {
    const byType: Record<string, LlamaArchitecture> = { llama: 'llama', mistral: 'mistral', qwen2: 'qwen2' };
    architecture = byType[modelType];
    if (!architecture) return fail('model_type', `names unsupported model type "${modelType}" (supported: llama, mistral, qwen2)`);
  }

  const hiddenAct = raw.hidden_act ?? 'silu';
  if (hiddenAct !== 'silu') fail('hidden_act', `must be "silu" (got ${JSON.stringify(hiddenAct)})`);

  const hiddenSize = positiveInt('hidden_size');
  const intermediateSize = positiveInt('intermediate_size');
  const numLayers = positiveInt('num_hidden_layers');
  const numHeads = positiveInt('num_attention_heads');
  const numKvHeads = positiveInt('num_key_value_heads', numHeads);
  if (numHeads % numKvHeads !== 0) fail('num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  let headDim: number;
  if (raw.head_dim !== undefined && raw.head_dim !== null) headDim = positiveInt('head_dim');
  else {
    if (hiddenSize % numHeads !== 0) fail('hidden_size', `(${hiddenSize}) must be divisible by num_attention_heads (${numHeads}) when head_dim is absent`);
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) fail('head_dim', `must be even for rotary embeddings (got ${headDim})`);
  const vocabSize = positiveInt('vocab_size');
  const rmsNormEps = positiveNumber('rms_norm_eps', 1e-6);
  // transformers v5 writes rope_theta and the scaling keys inside rope_parameters instead
  const ropeParameters = raw.rope_parameters;
  if (ropeParameters !== undefined && ropeParameters !== null && (typeof ropeParameters !== 'object' || Array.isArray(ropeParameters))) {
    fail('rope_parameters', 'must be an object or null');
  }
  const parameters = (ropeParameters ?? null) as Json | null;
  const ropeTheta =
    raw.rope_theta === undefined || raw.rope_theta === null
      ? positiveNumber('rope_theta', 10000, parameters ?? {}, 'rope_parameters.')
      : positiveNumber('rope_theta', 10000);
  let maxPositionEmbeddings = positiveInt('max_position_embeddings', 2048);

  let ropeScaling: RopeScaling | null = null;
  const scaling = raw.rope_scaling ?? parameters;
  if (scaling !== undefined && scaling !== null) {
    if (typeof scaling !== 'object' || Array.isArray(scaling)) fail('rope_scaling', 'must be an object or null');
    const s = scaling as Json;
    const field = raw.rope_scaling !== undefined && raw.rope_scaling !== null ? 'rope_scaling' : 'rope_parameters';
    // transformers v5's rope_parameters may hold only rope_theta: plain rope
    const type = s.rope_type ?? s.type ?? 'default';
    if (type === 'llama3') {
      // every key required, as transformers' llama3 rope validation requires them (it has no defaults)
      const required = (key: string): number => {
        if (s[key] === undefined || s[key] === null) return fail(`${field}.${key}`, 'is required for rope_type "llama3"');
        return positiveNumber(key, NaN, s, `${field}.`);
      };
      const factor = required('factor');
      const lowFreqFactor = required('low_freq_factor');
      const highFreqFactor = required('high_freq_factor');
      const originalMaxPositionEmbeddings = required('original_max_position_embeddings');
      if (highFreqFactor <= lowFreqFactor) fail(`${field}.high_freq_factor`, `(${highFreqFactor}) must exceed low_freq_factor (${lowFreqFactor})`);
      ropeScaling = { ropeType: 'llama3', factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings };
    } else if (type === 'linear') {
      ropeScaling = { ropeType: 'linear', factor: positiveNumber('factor', NaN, s, `${field}.`) };
    } else if (type !== 'default') {
      // dynamic NTK rescales with the batch's length (no longer batch invariant); yarn is not implemented
      fail(`${field}.rope_type`, `names unsupported rope scaling ${JSON.stringify(type)} (supported: llama3, linear, default)`);
    }
  }

  // Mistral/Qwen2 sliding windows: within the window attention is full, so cap the context there.
  // (MistralConfig's default window is 4096: only an explicit null turns it off)
  const slidingWindow = architecture === 'mistral' && !('sliding_window' in raw) ? 4096 : raw.sliding_window;
  const useSlidingWindow = architecture === 'qwen2' ? raw.use_sliding_window === true : architecture === 'mistral';
  if (useSlidingWindow && slidingWindow !== undefined && slidingWindow !== null) {
    if (typeof slidingWindow !== 'number' || !Number.isSafeInteger(slidingWindow) || slidingWindow <= 0) fail('sliding_window', 'must be a positive integer or null');
    maxPositionEmbeddings = Math.min(maxPositionEmbeddings, slidingWindow as number);
  }

  // Only Llama reads these flags: transformers' Mistral has no biases and Qwen2 has q/k/v biases alone,
  // whatever the config says (a flag there would otherwise demand tensors the checkpoint need not hold)
  const attentionBias = architecture === 'llama' && optionalBool('attention_bias', false);
  const mlpBias = architecture === 'llama' && optionalBool('mlp_bias', false);
  const tieWordEmbeddings = optionalBool('tie_word_embeddings', false);

  const tokenId = (field: string, value: unknown): number => {
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0 || value >= vocabSize) {
      return fail(field, `must be a token id in [0, ${vocabSize}) (got ${JSON.stringify(value)})`);
    }
    return value;
  };
  const bosTokenId = raw.bos_token_id === undefined || raw.bos_token_id === null ? null : tokenId('bos_token_id', raw.bos_token_id);
  let eosTokenIds: number[] = [];
  const eos = raw.eos_token_id;
  if (Array.isArray(eos)) eosTokenIds = eos.map((id) => tokenId('eos_token_id', id));
  else if (eos !== undefined && eos !== null) eosTokenIds = [tokenId('eos_token_id', eos)];

  return {
    architecture,
    modelType,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    rmsNormEps,
    ropeTheta,
    ropeScaling,
    maxPositionEmbeddings,
    tieWordEmbeddings,
    qkvBias: architecture === 'qwen2' || attentionBias,
    oBias: architecture !== 'qwen2' && attentionBias,
    mlpBias,
    bosTokenId,
    eosTokenIds,
    torchDtype: typeof raw.torch_dtype === 'string' ? raw.torch_dtype : null,
  };
}
