/**
 * The model layer's public surface (what the engine and the CLI import).
 *
 * - `loadLlamaModel(dir)` → LlamaModel (config + weights in stored dtype + rope inverse frequencies)
 * - `loadTokenizer(dir, config)` → ModelTokenizer (encode/decode, chat template, stream decoder, offsets)
 * - `forward(model, kernels, batch, cache, hook, scratch?)` → logits [batch.logitRows.length, vocab] (with a
 *   scratch, a view of its buffer that the next call overwrites)
 * - `allocateKvCache(config, numBlocks, blockSize)`, `kvCacheBytesPerBlock(config, blockSize)`
 * - `contiguousBatch(steps, blockSize)` builds a ForwardBatch for the simple contiguous-blocks case
 */
export type { AdapterHook, AdapterSlot, TargetModule } from './adapter-hook.js';
export { TARGET_MODULES } from './adapter-hook.js';
export type { ForwardBatch, KvCacheStorage } from './forward-batch.js';
export type { SequenceStep } from './forward.js';
export { allocateKvCache, contiguousBatch, forward, ForwardScratch, kvCacheBytesPerBlock } from './forward.js';
export type { LlamaArchitecture, LlamaConfig, RopeScaling } from './llama-config.js';
export { loadLlamaConfig, parseLlamaConfig } from './llama-config.js';
export type { LlamaModel } from './llama-model.js';
export { createLlamaModel, loadLlamaModel, modelWeightBytes } from './llama-model.js';
export type { ExpectedTensor, LayerWeights, LinearWeights, LlamaWeights } from './load-weights.js';
export { expectedTensors, loadLlamaWeights } from './load-weights.js';
export type { ChatMessage, TokenWithOffsets } from './tokenizer.js';
export { loadTokenizer, ModelTokenizer, StreamDecoder } from './tokenizer.js';
