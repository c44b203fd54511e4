/**
 * The forward pass of a Llama-family decoder over a flat batch of token rows from many sequences,
 * with a paged KV cache and a per-row adapter hook at every targeted linear. All math goes through
 * the KernelSet, so the reference and native kernels can be compared on the whole model.
 *
 *   embedding
 *   for each layer:
 *     rmsnorm → q, k, v (one matmul group, with the hook's adapters, + bias) → rope → write K/V to the cache
 *     → attention → o_proj (+ adapters) → residual
 *     rmsnorm → gate, up (one group, + adapters) → silu(gate)·up → down (+ adapters) → residual
 *   final rmsnorm → lm_head, for batch.logitRows only
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { KernelSet, MatmulGroupPart } from '../kernels/kernel-set.js';
import type { AdapterHook, TargetModule } from './adapter-hook.js';
import type { ForwardBatch, KvCacheStorage } from './forward-batch.js';
import type { LlamaConfig } from './llama-config.js';
import type { LlamaModel } from './llama-model.js';
import type { LinearWeights } from './load-weights.js';

/** The most logits bytes a ForwardScratch keeps between calls (64 MiB: a decode step of 128 rows of a 128k vocabulary). */
const LOGITS_SCRATCH_BYTES = 64 * 2 ** 20;

/**
 * Activation buffers reused across forward calls (sized for the largest batch seen so far).
 * Keep one per engine (not shared between concurrent callers).
 */
export class ForwardScratch {
  private capacity = 0;
  /** residual stream x: [M, dModel] */
  x = new Float32Array(0);
  /** normed input of the current block: [M, dModel] */
  normed = new Float32Array(0);
  /** [M, H·D] */
  q = new Float32Array(0);
  /** [M, Hkv·D] */
  k = new Float32Array(0);
  /** [M, Hkv·D] */
  v = new Float32Array(0);
  /** attention output: [M, H·D] */
  attention = new Float32Array(0);
  /** o_proj / down_proj output: [M, dModel] */
  projected = new Float32Array(0);
  /** [M, dFfn] */
  gate = new Float32Array(0);
  /** [M, dFfn] */
  up = new Float32Array(0);
  /** logits: [L, vocab], reused while they fit in LOGITS_SCRATCH_BYTES (a fresh 6 MB array per decode step cost page faults and GC) */
  private logits = new Float32Array(0);

  constructor(readonly config: LlamaConfig, rows = 1) {
    this.ensure(rows);
  }

  /** True when the buffers have the widths of `config` (scratch from another model is not reused). */
  fits(config: LlamaConfig): boolean {
    const mine = this.config;
    return mine === config || (mine.vocabSize === config.vocabSize && mine.hiddenSize === config.hiddenSize && mine.intermediateSize === config.intermediateSize && mine.numHeads === config.numHeads && mine.numKvHeads === config.numKvHeads && mine.headDim === config.headDim);
  }

  /**
   * A logits buffer [rows, vocab]: a view of the scratch's own buffer (valid until the next call) while it
   * fits in LOGITS_SCRATCH_BYTES, else a fresh array (long prompts with prompt logprobs are not kept).
   */
  logitsFor(rows: number): Float32Array {
    const length = rows * this.config.vocabSize;
    if (length * 4 > LOGITS_SCRATCH_BYTES) return new Float32Array(length);
    if (this.logits.length < length) this.logits = new Float32Array(length);
    return this.logits.subarray(0, length);
  }

  /** Grow the buffers to hold `rows` rows (never shrinks). */
  ensure(rows: number): void {
    if (rows <= this.capacity) return;
    const { hiddenSize: dModel, intermediateSize: dFfn, numHeads, numKvHeads, headDim } = this.config;
    this.capacity = rows;
    this.x = new Float32Array(rows * dModel);
    this.normed = new Float32Array(rows * dModel);
    this.q = new Float32Array(rows * numHeads * headDim);
    this.k = new Float32Array(rows * numKvHeads * headDim);
    this.v = new Float32Array(rows * numKvHeads * headDim);
    this.attention = new Float32Array(rows * numHeads * headDim);
    this.projected = new Float32Array(rows * dModel);
    this.gate = new Float32Array(rows * dFfn);
    this.up = new Float32Array(rows * dFfn);
  }
}

/**
 * Run one step. Writes the K/V of every batch row into `cache`, and returns the logits
 * [batch.logitRows.length, vocab] (row i is the logits of batch row logitRows[i]): with a `scratch`, usually
 * a view of its buffer, overwritten by the next call with that scratch; without one, a fresh array.
 * `hook` (or null for the base model alone) gives each targeted linear its rows' adapters.
 */
export function forward(model: LlamaModel, kernels: KernelSet, batch: ForwardBatch, cache: KvCacheStorage, hook: AdapterHook | null, scratch?: ForwardScratch): Float32Array {
  const { config, weights, invFreq } = model;
  checkBatch(config, batch, cache);
  const m = batch.tokens.length;
  const { hiddenSize: dModel, intermediateSize: dFfn, numHeads, numKvHeads, headDim, rmsNormEps: eps } = config;
  const qDim = numHeads * headDim;
  const kvDim = numKvHeads * headDim;
  const buffers = scratch && scratch.fits(config) ? scratch : new ForwardScratch(config, m);
  buffers.ensure(m);
  const x = buffers.x.subarray(0, m * dModel); // x: [M, dModel] residual stream
  const normed = buffers.normed.subarray(0, m * dModel); // normed: [M, dModel]
  const q = buffers.q.subarray(0, m * qDim); // q: [M, H·D]
  const k = buffers.k.subarray(0, m * kvDim); // k: [M, Hkv·D]
  const v = buffers.v.subarray(0, m * kvDim); // v: [M, Hkv·D]
  const attended = buffers.attention.subarray(0, m * qDim); // attended: [M, H·D]
  const projected = buffers.projected.subarray(0, m * dModel); // projected: [M, dModel]
  const gate = buffers.gate.subarray(0, m * dFfn); // gate: [M, dFfn]
  const up = buffers.up.subarray(0, m * dFfn); // up: [M, dFfn]

  // per linear, y = input·Wᵀ plus each row's adapter delta, for linears that read the same input: one
  // kernel call (the weights stream in one run, a decode step's q, k and v being a few hundred KB each) + biases
  const linears = (input: Float32Array, layer: number, outputs: readonly (readonly [Float32Array, LinearWeights, TargetModule])[]): void => {
    const parts = outputs.map(([y, linear, module]): MatmulGroupPart => {
      const slot = hook ? hook(layer, module, m) : null;
      return slot ? { y, w: linear.weight, segments: slot.segments, cores: slot.cores } : { y, w: linear.weight };
    });
    kernels.matmulGroup(input, m, parts); // each y: [M, N]
    for (const [y, linear] of outputs) if (linear.bias) kernels.addBias(y, linear.bias, m, linear.weight.rows);
  };

  kernels.embedding(x, weights.embedding, batch.tokens, m); // x: [M, dModel]

  for (let l = 0; l < config.numLayers; l++) {
    const layer = weights.layers[l]!;
    const kCache = cache.k[l]!; // [numBlocks, blockSize, Hkv, D]
    const vCache = cache.v[l]!; // [numBlocks, blockSize, Hkv, D]

    // --- attention block ---
    kernels.rmsnorm(normed, x, layer.inputNorm, m, dModel, eps); // normed: [M, dModel]
    linears(normed, l, [[q, layer.q, 'q_proj'], [k, layer.k, 'k_proj'], [v, layer.v, 'v_proj']]); // q: [M, H·D]; k, v: [M, Hkv·D]
    kernels.rope(q, batch.positions, m, numHeads, headDim, invFreq); // q: [M, H·D]
    kernels.rope(k, batch.positions, m, numKvHeads, headDim, invFreq); // k: [M, Hkv·D]
    for (let s = 0; s < batch.seqs; s++) {
      // row i of sequence s sits at position ctxLen − qLen + i, in block blockTable[start + pos / blockSize]
      const first = batch.qStart[s]!;
      const rows = batch.qLen[s]!;
      const firstPosition = batch.ctxLen[s]! - rows;
      const tableStart = batch.blockTableStart[s]!;
      for (let i = 0; i < rows; i++) {
        const position = firstPosition + i;
        const block = batch.blockTable[tableStart + Math.floor(position / cache.blockSize)]!;
        const slot = (block * cache.blockSize + (position % cache.blockSize)) * kvDim;
        const row = (first + i) * kvDim;
        kCache.set(k.subarray(row, row + kvDim), slot); // kCache[block, position % blockSize]: [Hkv, D]
        vCache.set(v.subarray(row, row + kvDim), slot); // vCache[block, position % blockSize]: [Hkv, D]
      }
    }
    kernels.attention({
      out: attended, // [M, H·D]
      q, // [M, H·D]
      kCache,
      vCache,
      blockTable: batch.blockTable,
      blockTableStart: batch.blockTableStart,
      qStart: batch.qStart,
      qLen: batch.qLen,
      ctxLen: batch.ctxLen,
      seqs: batch.seqs,
      heads: numHeads,
      kvHeads: numKvHeads,
      headDim,
      blockSize: cache.blockSize,
      scale: 1 / Math.sqrt(headDim),
    });
    linears(attended, l, [[projected, layer.o, 'o_proj']]); // projected: [M, dModel]
    kernels.add(x, x, projected, m * dModel); // x: [M, dModel]

    // --- MLP block ---
    kernels.rmsnorm(normed, x, layer.postAttentionNorm, m, dModel, eps); // normed: [M, dModel]
    linears(normed, l, [[gate, layer.gate, 'gate_proj'], [up, layer.up, 'up_proj']]); // gate, up: [M, dFfn]
    kernels.siluMul(gate, gate, up, m * dFfn); // gate: [M, dFfn] = silu(gate)·up
    linears(gate, l, [[projected, layer.down, 'down_proj']]); // projected: [M, dModel]
    kernels.add(x, x, projected, m * dModel); // x: [M, dModel]
  }

  // --- logits, only for the rows asked for ---
  const logitRows = batch.logitRows.length;
  const last = normed.subarray(0, logitRows * dModel); // last: [L, dModel] (L ≤ M, reuses normed)
  for (let i = 0; i < logitRows; i++) {
    const row = batch.logitRows[i]!;
    last.set(x.subarray(row * dModel, (row + 1) * dModel), i * dModel);
  }
  kernels.rmsnorm(last, last, weights.finalNorm, logitRows, dModel, eps); // last: [L, dModel]
  const logits = buffers.logitsFor(logitRows); // logits: [L, vocab]
  kernels.matmul(logits, last, weights.lmHead, logitRows);
  return logits;
}

/** Cheap O(M + seqs) consistency checks, so a malformed batch fails loudly instead of corrupting the cache. */
function checkBatch(config: LlamaConfig, batch: ForwardBatch, cache: KvCacheStorage): void {
  const bad = (message: string, field: string): never => {
    throw new SoppuError('INTERNAL', `forward: malformed batch: ${message}`, { field });
  };
  const m = batch.tokens.length;
  if (m === 0) bad('no token rows', 'tokens');
  if (batch.positions.length !== m) bad(`positions has ${batch.positions.length} entries for ${m} rows`, 'positions');
  const kvDim = config.numKvHeads * config.headDim;
  if (cache.k.length !== config.numLayers || cache.v.length !== config.numLayers) bad(`KV cache has ${cache.k.length} layers, model has ${config.numLayers}`, 'cache');
  const layerSize = cache.numBlocks * cache.blockSize * kvDim;
  for (let l = 0; l < config.numLayers; l++) {
    if (cache.k[l]!.length !== layerSize || cache.v[l]!.length !== layerSize) bad(`KV cache layer ${l} has ${cache.k[l]!.length} floats, expected ${layerSize}`, 'cache');
  }
  for (const field of ['qStart', 'qLen', 'ctxLen', 'blockTableStart'] as const) {
    if (batch[field].length < batch.seqs) bad(`${field} has ${batch[field].length} entries for ${batch.seqs} sequences`, field);
  }
  let rows = 0;
  for (let s = 0; s < batch.seqs; s++) {
    const first = batch.qStart[s]!;
    const count = batch.qLen[s]!;
    const context = batch.ctxLen[s]!;
    if (count < 1 || first < 0 || first + count > m) bad(`sequence ${s} rows [${first}, ${first + count}) outside [0, ${m})`, 'qStart');
    if (context < count) bad(`sequence ${s} has ctxLen ${context} < qLen ${count}`, 'ctxLen');
    if (context > config.maxPositionEmbeddings) bad(`sequence ${s} has ctxLen ${context} beyond max_position_embeddings ${config.maxPositionEmbeddings}`, 'ctxLen');
    const tableStart = batch.blockTableStart[s]!;
    const blocks = Math.ceil(context / cache.blockSize);
    if (tableStart < 0 || tableStart + blocks > batch.blockTable.length) bad(`sequence ${s} needs ${blocks} blocks from ${tableStart}, table has ${batch.blockTable.length}`, 'blockTable');
    for (let j = 0; j < blocks; j++) {
      const block = batch.blockTable[tableStart + j]!;
      if (block < 0 || block >= cache.numBlocks) bad(`sequence ${s} block ${j} is ${block}, cache has ${cache.numBlocks}`, 'blockTable');
    }
    for (let i = 0; i < count; i++) {
      if (batch.positions[first + i] !== context - count + i) bad(`row ${first + i} has position ${batch.positions[first + i]}, expected ${context - count + i}`, 'positions');
    }
    rows += count;
  }
  if (rows !== m) bad(`sequences cover ${rows} rows, batch has ${m}`, 'qLen');
  for (let i = 0; i < m; i++) {
    const id = batch.tokens[i]!;
    if (id < 0 || id >= config.vocabSize) {
      throw new SoppuError('VALIDATION', `token id ${id} at row ${i} is outside the vocabulary [0, ${config.vocabSize})`, { field: 'tokens', limit: config.vocabSize });
    }
  }
  for (let i = 0; i < batch.logitRows.length; i++) {
    const row = batch.logitRows[i]!;
    if (row < 0 || row >= m) bad(`logitRows[${i}] = ${row} outside [0, ${m})`, 'logitRows');
  }
}

/** Bytes of KV cache one block takes across all layers (K and V, f32). */
export function kvCacheBytesPerBlock(config: LlamaConfig, blockSize: number): number {
  return 2 * config.numLayers * blockSize * config.numKvHeads * config.headDim * 4;
}

/** Allocate zeroed paged KV storage for `config`: per layer k, v: [numBlocks, blockSize, Hkv, D] f32. */
export function allocateKvCache(config: LlamaConfig, numBlocks: number, blockSize: number): KvCacheStorage {
  if (!Number.isSafeInteger(numBlocks) || numBlocks < 1) throw new SoppuError('CONFIG', `KV cache: numBlocks must be a positive integer (got ${numBlocks})`, { field: 'numBlocks' });
  if (!Number.isSafeInteger(blockSize) || blockSize < 1) throw new SoppuError('CONFIG', `KV cache: blockSize must be a positive integer (got ${blockSize})`, { field: 'blockSize' });
  const layerSize = numBlocks * blockSize * config.numKvHeads * config.headDim;
  const k: Float32Array[] = [];
  const v: Float32Array[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    k.push(new Float32Array(layerSize));
    v.push(new Float32Array(layerSize));
  }
  return { numBlocks, blockSize, k, v };
}

/** One sequence's step for `contiguousBatch`. */
export interface SequenceStep {
  /** The new tokens of this step. */
  readonly tokens: ArrayLike<number>;
  /** Tokens already in the cache before this step. */
  readonly pastLength: number;
  /** The sequence owns blocks firstBlock, firstBlock + 1, … (contiguous). */
  readonly firstBlock: number;
}

/**
 * A ForwardBatch for the simple case (tests, single-user tools): each sequence's blocks are
 * contiguous from its firstBlock. Logits for each sequence's last row, or for every row.
 */
export function contiguousBatch(steps: readonly SequenceStep[], blockSize: number, logits: 'last' | 'all' = 'last'): ForwardBatch {
  const m = steps.reduce((sum, step) => sum + step.tokens.length, 0);
  const tokens = new Int32Array(m);
  const positions = new Int32Array(m);
  const qStart = new Int32Array(steps.length);
  const qLen = new Int32Array(steps.length);
  const ctxLen = new Int32Array(steps.length);
  const blockTableStart = new Int32Array(steps.length);
  const table: number[] = [];
  const logitRows: number[] = [];
  let row = 0;
  steps.forEach((step, s) => {
    qStart[s] = row;
    qLen[s] = step.tokens.length;
    ctxLen[s] = step.pastLength + step.tokens.length;
    blockTableStart[s] = table.length;
    for (let j = 0; j < Math.ceil(ctxLen[s]! / blockSize); j++) table.push(step.firstBlock + j);
    for (let i = 0; i < step.tokens.length; i++) {
      tokens[row] = step.tokens[i]!;
      positions[row] = step.pastLength + i;
      if (logits === 'all' || i === step.tokens.length - 1) logitRows.push(row);
      row++;
    }
  });
  return { tokens, positions, seqs: steps.length, qStart, qLen, ctxLen, blockTable: Int32Array.from(table), blockTableStart, logitRows: Int32Array.from(logitRows) };
}
