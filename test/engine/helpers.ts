/**
 * Test fixtures for the engine: a tiny seeded Llama model built in memory, a character tokenizer,
 * raw LoRA adapters and a hand-built compressed bank (U, Σ, Vᵀ) whose adapters can also be exported
 * raw (A = Vᵀ, s·B = U·Σ), so the two paths can be compared.
 */
import { SoppuError } from '../../src/errors/soppu-error.js';
import type { BankAdapterParts, BankReader, BankSlotPart, SharedBases } from '../../src/compress/bank-reader-types.js';
import type { LoraAdapter, LoraConfig, LoraModule } from '../../src/io/lora-types.js';
import { TARGET_MODULES, type TargetModule } from '../../src/model/adapter-hook.js';
import { parseLlamaConfig, type LlamaConfig } from '../../src/model/llama-config.js';
import { createLlamaModel, type LlamaModel } from '../../src/model/llama-model.js';
import type { LayerWeights, LinearWeights } from '../../src/model/load-weights.js';
import type { EngineTokenizer } from '../../src/engine/engine-tokenizer.js';
import { slotShapeOf } from '../../src/engine/engine.js';
import { Random } from '../../src/tensor/random.js';
import { f32ArrayToBf16 } from '../../src/tensor/dtype.js';
import { weightMatrix, type WeightMatrix } from '../../src/tensor/weight-matrix.js';

export const CHARSET = 'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?0123456789';
export const BOS = 0;
export const EOS = 1;

export function tinyConfig(vocab = 64): LlamaConfig {
  return parseLlamaConfig({
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 32,
    intermediate_size: 48,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: vocab,
    max_position_embeddings: 512,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    bos_token_id: BOS,
    eos_token_id: EOS,
    tie_word_embeddings: false,
  });
}

function randomLinear(random: Random, rows: number, cols: number, std: number): LinearWeights {
  return { weight: weightMatrix('f32', rows, cols, random.fillNormal(new Float32Array(rows * cols), std)), bias: null };
}

/** A seeded random tiny model (f32). */
export function tinyModel(seed = 1, config = tinyConfig()): LlamaModel {
  const random = new Random(seed);
  const d = config.hiddenSize;
  const qDim = config.numHeads * config.headDim;
  const kvDim = config.numKvHeads * config.headDim;
  const ones = (n: number): Float32Array => new Float32Array(n).fill(1);
  const layers: LayerWeights[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    layers.push({
      inputNorm: ones(d),
      q: randomLinear(random, qDim, d, 0.3),
      k: randomLinear(random, kvDim, d, 0.3),
      v: randomLinear(random, kvDim, d, 0.3),
      o: randomLinear(random, d, qDim, 0.3),
      postAttentionNorm: ones(d),
      gate: randomLinear(random, config.intermediateSize, d, 0.3),
      up: randomLinear(random, config.intermediateSize, d, 0.3),
      down: randomLinear(random, d, config.intermediateSize, 0.3),
    });
  }
  const embedding = weightMatrix('f32', config.vocabSize, d, random.fillNormal(new Float32Array(config.vocabSize * d), 1));
  const lmHead = weightMatrix('f32', config.vocabSize, d, random.fillNormal(new Float32Array(config.vocabSize * d), 0.5));
  return createLlamaModel(config, { embedding, layers, finalNorm: ones(d), lmHead });
}

/** Character tokenizer: 0 = <s>, 1 = </s>, then one id per CHARSET character. */
export function charTokenizer(): EngineTokenizer {
  return {
    encode(text, addSpecialTokens) {
      const ids: number[] = addSpecialTokens ? [BOS] : [];
      for (const char of text) {
        const at = CHARSET.indexOf(char);
        ids.push(at < 0 ? 2 + CHARSET.indexOf('?') : 2 + at);
      }
      return ids;
    },
    tokenizeWithOffsets(text, addSpecialTokens) {
      return this.encode(text, addSpecialTokens).map((id, i) => {
        const at = addSpecialTokens ? i - 1 : i;
        return at < 0 ? { id, text: '<s>', start: 0, stop: 0 } : { id, text: text[at]!, start: at, stop: at + 1 };
      });
    },
    decode(ids, skipSpecialTokens) {
      let text = '';
      for (const id of ids) {
        if (id === BOS) text += skipSpecialTokens ? '' : '<s>';
        else if (id === EOS) text += skipSpecialTokens ? '' : '</s>';
        else text += CHARSET[id - 2] ?? '';
      }
      return text;
    },
    isSpecial: (id) => id === BOS || id === EOS,
    applyChatTemplate: (messages, addGenerationPrompt) =>
      messages.map((m) => `${m.role}: ${m.content}\n`).join('') + (addGenerationPrompt ? 'assistant: ' : ''),
  };
}

const LINEAR_OF: Record<TargetModule, keyof LayerWeights> = {
  q_proj: 'q',
  k_proj: 'k',
  v_proj: 'v',
  o_proj: 'o',
  gate_proj: 'gate',
  up_proj: 'up',
  down_proj: 'down',
};

export function modulePath(layer: number, module: TargetModule): string {
  const block = module.endsWith('proj') && ['gate_proj', 'up_proj', 'down_proj'].includes(module) ? 'mlp' : 'self_attn';
  return `model.layers.${layer}.${block}.${module}`;
}

const BASE_LORA_CONFIG: LoraConfig = {
  peftType: 'LORA',
  r: 4,
  loraAlpha: 8,
  useRslora: false,
  targetModules: [...TARGET_MODULES],
  rankPattern: {},
  alphaPattern: {},
  fanInFanOut: false,
  layersToTransform: null,
  modulesToSave: null,
  bias: 'none',
  baseModelNameOrPath: null,
  raw: {},
};

/** A random raw LoRA adapter over every target module of every layer. */
export function randomLora(config: LlamaConfig, seed: number, rank = 4, alpha = 8, std = 0.25): LoraAdapter {
  const random = new Random(seed);
  const shape = slotShapeOf(config);
  const modules = new Map<string, LoraModule>();
  for (let layer = 0; layer < config.numLayers; layer++) {
    for (const module of TARGET_MODULES) {
      const { inFeatures, outFeatures } = shape(layer, module)!;
      const path = modulePath(layer, module);
      modules.set(path, {
        path,
        layer,
        module,
        rank,
        inFeatures,
        outFeatures,
        scale: alpha / rank,
        alpha,
        a: random.fillNormal(new Float32Array(rank * inFeatures), std),
        b: random.fillNormal(new Float32Array(outFeatures * rank), std),
      });
    }
  }
  return { source: `/adapters/raw-${seed}`, config: { ...BASE_LORA_CONFIG, r: rank, loraAlpha: alpha }, modules, passthrough: [], sourceDtype: 'F32', flags: [] };
}

/** The model with every adapted weight replaced by W + s·B·A (the merged reference). */
export function mergedModel(model: LlamaModel, adapter: LoraAdapter): LlamaModel {
  const layers = model.weights.layers.map((layer, l) => {
    const merged: Record<string, unknown> = { ...layer };
    for (const module of TARGET_MODULES) {
      const lora = adapter.modules.get(modulePath(l, module));
      const linear = layer[LINEAR_OF[module]] as LinearWeights;
      if (!lora) continue;
      const w = new Float32Array(linear.weight.data as Float32Array);
      for (let o = 0; o < lora.outFeatures; o++) {
        for (let i = 0; i < lora.inFeatures; i++) {
          let sum = 0;
          for (let j = 0; j < lora.rank; j++) sum += lora.b[o * lora.rank + j]! * lora.a[j * lora.inFeatures + i]!;
          w[o * lora.inFeatures + i] = w[o * lora.inFeatures + i]! + lora.scale * sum;
        }
      }
      merged[LINEAR_OF[module]] = { weight: weightMatrix('f32', lora.outFeatures, lora.inFeatures, w), bias: linear.bias };
    }
    return merged as unknown as LayerWeights;
  });
  return createLlamaModel(model.config, { ...model.weights, layers });
}

/** The model with every linear weight, the embedding and the LM head rounded to bf16 (kept bf16). */
export function bf16Copy(model: LlamaModel): LlamaModel {
  const narrow = (m: WeightMatrix): WeightMatrix => weightMatrix('bf16', m.rows, m.cols, f32ArrayToBf16(m.data as Float32Array));
  const layers = model.weights.layers.map((layer) => {
    const copy: Record<string, unknown> = { ...layer };
    for (const module of TARGET_MODULES) {
      const linear = layer[LINEAR_OF[module]] as LinearWeights;
      copy[LINEAR_OF[module]] = { weight: narrow(linear.weight), bias: linear.bias };
    }
    return copy as unknown as LayerWeights;
  });
  return createLlamaModel(model.config, { ...model.weights, layers, embedding: narrow(model.weights.embedding), lmHead: narrow(model.weights.lmHead) });
}

/** Orthonormal columns: Q of a QR (Gram–Schmidt) of a random [n, r] matrix, row-major. */
function orthonormal(random: Random, n: number, r: number): Float32Array {
  const q = new Float64Array(n * r);
  for (let j = 0; j < r; j++) {
    const column = new Float64Array(n);
    for (let i = 0; i < n; i++) column[i] = random.normal();
    for (let p = 0; p < j; p++) {
      let dot = 0;
      for (let i = 0; i < n; i++) dot += column[i]! * q[i * r + p]!;
      for (let i = 0; i < n; i++) column[i] = column[i]! - dot * q[i * r + p]!;
    }
    let norm = 0;
    for (let i = 0; i < n; i++) norm += column[i]! ** 2;
    norm = Math.sqrt(norm);
    for (let i = 0; i < n; i++) q[i * r + j] = column[i]! / norm;
  }
  return Float32Array.from(q);
}

export interface HandBank {
  readonly reader: BankReader;
  /** The same adapter exported raw: A = Vᵀ, B = U·Σ, scale 1 (so s·B·A = U·Σ·Vᵀ). */
  readonly exportRaw: (id: string) => LoraAdapter;
  /** Calls of loadAdapter and loadBases (to check sharing). */
  readonly calls: { adapters: number; bases: number };
}

/**
 * A bank built by hand: `clusters` clusters of shared bases per slot (rank R), and adapters
 * `c<cluster>-<n>` with a full or diagonal core each. Ids in `corrupt` fail to load (BANK_CORRUPT).
 */
export function handBank(config: LlamaConfig, options: { clusters: number; perCluster: number; rank: number; seed: number; diagonal?: boolean; corrupt?: readonly string[] }): HandBank {
  const random = new Random(options.seed);
  const shape = slotShapeOf(config);
  const R = options.rank;
  const bases = new Map<string, SharedBases>();
  const adapters = new Map<string, BankAdapterParts>();
  const calls = { adapters: 0, bases: 0 };
  for (let c = 0; c < options.clusters; c++) {
    for (let layer = 0; layer < config.numLayers; layer++) {
      for (const module of TARGET_MODULES) {
        const { inFeatures, outFeatures } = shape(layer, module)!;
        const key = `c${c}/${modulePath(layer, module)}`;
        const u = orthonormal(random, outFeatures, R); // U: [out, R]
        const v = orthonormal(random, inFeatures, R); // V: [in, R]
        const vt = new Float32Array(R * inFeatures); // Vᵀ: [R, in]
        for (let i = 0; i < inFeatures; i++) for (let j = 0; j < R; j++) vt[j * inFeatures + i] = v[i * R + j]!;
        bases.set(key, { key, path: modulePath(layer, module), rank: R, inFeatures, outFeatures, u, vt, bytes: (u.length + vt.length) * 4 });
      }
    }
    for (let n = 0; n < options.perCluster; n++) {
      const id = `c${c}-${n}`;
      const slots = new Map<string, BankSlotPart>();
      let bytes = 0;
      for (let layer = 0; layer < config.numLayers; layer++) {
        for (const module of TARGET_MODULES) {
          const path = modulePath(layer, module);
          const diagonal = options.diagonal ?? false;
          const core = random.fillNormal(new Float32Array(diagonal ? R : R * R), 0.4);
          slots.set(path, { kind: 'compressed', path, basesKey: `c${c}/${path}`, rank: R, diagonal, core });
          bytes += core.length * 4;
        }
      }
      adapters.set(id, { id, cluster: c, slots, bytes });
    }
  }
  const corrupt = new Set(options.corrupt ?? []);
  const reader: BankReader = {
    dir: '/banks/hand',
    baseModel: null,
    ids: () => [...adapters.keys()].sort(),
    has: (id) => adapters.has(id),
    async loadAdapter(id) {
      calls.adapters++;
      await new Promise((resolve) => setImmediate(resolve));
      if (corrupt.has(id)) throw new SoppuError('BANK_CORRUPT', `adapter ${id}: cores.safetensors checksum mismatch`, { file: `/banks/hand/${id}/cores.safetensors` });
      const parts = adapters.get(id);
      if (!parts) throw new SoppuError('ADAPTER_NOT_FOUND', `adapter ${id} is not in the bank`);
      return parts;
    },
    hasCompressedSlots(id) {
      return [...(adapters.get(id)?.slots.values() ?? [])].some((part) => part.kind === 'compressed');
    },
    basesOf(id) {
      const parts = adapters.get(id);
      if (!parts) return [];
      return [...parts.slots.values()].flatMap((part) => (part.kind === 'compressed' ? [{ key: part.basesKey, elements: bases.get(part.basesKey)!.u.length + bases.get(part.basesKey)!.vt.length }] : []));
    },
    async loadBases(key) {
      calls.bases++;
      await new Promise((resolve) => setImmediate(resolve));
      const found = bases.get(key);
      if (!found) throw new SoppuError('BANK_CORRUPT', `bases ${key} missing`);
      return found;
    },
  };
  const exportRaw = (id: string): LoraAdapter => {
    const parts = adapters.get(id)!;
    const modules = new Map<string, LoraModule>();
    for (const [path, part] of parts.slots) {
      if (part.kind !== 'compressed') continue;
      const b = bases.get(part.basesKey)!;
      const us = new Float32Array(b.outFeatures * R); // U·Σ: [out, R]
      for (let o = 0; o < b.outFeatures; o++) {
        for (let j = 0; j < R; j++) {
          let sum = 0;
          if (part.diagonal) sum = b.u[o * R + j]! * part.core[j]!;
          else for (let p = 0; p < R; p++) sum += b.u[o * R + p]! * part.core[p * R + j]!;
          us[o * R + j] = sum;
        }
      }
      const match = /layers\.(\d+)\..*\.(\w+)$/.exec(path)!;
      modules.set(path, { path, layer: Number(match[1]), module: match[2]!, rank: R, inFeatures: b.inFeatures, outFeatures: b.outFeatures, scale: 1, alpha: R, a: new Float32Array(b.vt), b: us });
    }
    return { source: `/adapters/export-${id}`, config: { ...BASE_LORA_CONFIG, r: R, loraAlpha: R }, modules, passthrough: [], sourceDtype: 'F32', flags: [] };
  };
  return { reader, exportRaw, calls };
}

/** A PEFT loader over in-memory adapters keyed by directory; missing or listed-as-corrupt dirs fail. */
export function memoryLoader(adapters: Map<string, LoraAdapter>, corrupt: ReadonlySet<string> = new Set()): (dir: string) => Promise<LoraAdapter> {
  return async (dir) => {
    await new Promise((resolve) => setImmediate(resolve));
    if (corrupt.has(dir)) throw new SoppuError('ADAPTER_TENSORS', `${dir}/adapter_model.safetensors: tensor lora_A of q_proj is truncated`, { file: `${dir}/adapter_model.safetensors` });
    const adapter = adapters.get(dir);
    if (!adapter) throw new SoppuError('FILE_NOT_FOUND', `${dir}/adapter_config.json does not exist`, { file: `${dir}/adapter_config.json` });
    return adapter;
  };
}

/** Collects a request's events. */
export async function collect(events: AsyncIterable<import('../../src/engine/engine-types.js').GenerateEvent>): Promise<{ tokens: number[]; text: string; stopText?: string; finishReason: string; seed: number | null; logprobs: number[] }> {
  const tokens: number[] = [];
  const logprobs: number[] = [];
  for await (const event of events) {
    if (event.type === 'token') {
      tokens.push(event.token.id);
      logprobs.push(event.token.logprob);
    } else {
      return { tokens, text: event.generatedText, ...(event.stopText !== undefined ? { stopText: event.stopText } : {}), finishReason: event.finishReason, seed: event.seed, logprobs };
    }
  }
  throw new Error('stream ended without a done event');
}
