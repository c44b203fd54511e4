/**
 * A loaded Llama-family model: config + weights + the rotary inverse frequencies. What `forward` takes.
 */
import { largePageBuffer } from '../kernels/large-page-buffer.js';
import { ropeInvFreq } from '../kernels/ref/rope-inv-freq.js';
import type { LlamaConfig } from './llama-config.js';
import { loadLlamaConfig } from './llama-config.js';
import type { LlamaWeights } from './load-weights.js';
import type { WeightDtype } from '../tensor/dtype.js';
import { loadLlamaWeights } from './load-weights.js';

export interface LlamaModel {
  readonly config: LlamaConfig;
  readonly weights: LlamaWeights;
  /** [D/2] rotary inverse frequencies, Llama-3 scaling folded in. */
  readonly invFreq: Float32Array;
}

/** Assemble a model from a config and matching weights (e.g. weights built in memory by a test). */
export function createLlamaModel(config: LlamaConfig, weights: LlamaWeights): LlamaModel {
  return { config, weights, invFreq: ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling) };
}

/** Load config.json and the safetensors weights of `modelDir` (the matrices in one huge-page buffer where possible). */
export async function loadLlamaModel(modelDir: string): Promise<LlamaModel> {
  const config = await loadLlamaConfig(modelDir);
  const weights = await loadLlamaWeights(modelDir, config, { allocate: largePageBuffer });
  return createLlamaModel(config, weights);
}

/** The dtype the model's linear weights are stored in (the embedding's for a model without layers). */
export function modelWeightDtype(model: LlamaModel): WeightDtype {
  return model.weights.layers[0]?.q.weight.dtype ?? model.weights.embedding.dtype;
}

/** Bytes held by the matmul weights and vectors (the embedding counted once when tied). */
export function modelWeightBytes(model: LlamaModel): number {
  const seen = new Set<object>();
  let bytes = 0;
  const count = (array: { byteLength: number } | null): void => {
    if (array && !seen.has(array)) {
      seen.add(array);
      bytes += array.byteLength;
    }
  };
  const { weights } = model;
  count(weights.embedding.data);
  count(weights.lmHead.data);
  count(weights.finalNorm);
  for (const layer of weights.layers) {
    count(layer.inputNorm);
    count(layer.postAttentionNorm);
    for (const linear of [layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down]) {
      count(linear.weight.data);
      count(linear.bias);
    }
  }
  return bytes;
}
