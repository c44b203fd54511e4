import { describe, expect, it } from 'vitest';
import { refKernels, supportedNativeKernelSets } from '../../src/kernels/index.js';
import type { AdapterHook, AdapterSlot, TargetModule } from '../../src/model/adapter-hook.js';
import type { ForwardBatch } from '../../src/model/forward-batch.js';
import { allocateKvCache, contiguousBatch, forward, ForwardScratch } from '../../src/model/forward.js';
import { createLlamaModel } from '../../src/model/llama-model.js';
import type { LayerWeights, LinearWeights } from '../../src/model/load-weights.js';
import { Random } from '../../src/tensor/random.js';
import { weightMatrix } from '../../src/tensor/weight-matrix.js';
import { argmax, maxAbs, maxAbsDiff, runSequence, tinyModel } from './model-helpers.js';

const PROMPT = [5, 300, 17, 42, 99, 250, 3, 77, 401, 12, 64];

describe('forward pass on the generated tiny model', () => {
  it('gives finite, spread logits, and greedy decoding does not repeat one token', async () => {
    const model = await tinyModel();
    const cache = allocateKvCache(model.config, 8, 8);
    const scratch = new ForwardScratch(model.config);
    let logits = forward(model, refKernels, contiguousBatch([{ tokens: PROMPT, pastLength: 0, firstBlock: 0 }], 8), cache, null, scratch);
    expect(logits.length).toBe(model.config.vocabSize);
    expect(logits.every(Number.isFinite)).toBe(true);
    expect(maxAbs(logits)).toBeGreaterThan(1);
    expect(maxAbs(logits)).toBeLessThan(100);
    const generated: number[] = [];
    for (let step = 0; step < 24; step++) {
      const next = argmax(logits);
      generated.push(next);
      logits = forward(model, refKernels, contiguousBatch([{ tokens: [next], pastLength: PROMPT.length + step, firstBlock: 0 }], 8), cache, null, scratch);
    }
    expect(new Set(generated).size).toBeGreaterThanOrEqual(4);
  });

  it('with a scratch, logits are a reused view (overwritten by the next call), equal to a fresh call\'s; beyond the scratch limit, fresh arrays', async () => {
    const model = await tinyModel();
    const batchOf = (tokens: number[], past: number) => contiguousBatch([{ tokens, pastLength: past, firstBlock: 0 }], 8);
    const scratchCache = allocateKvCache(model.config, 8, 8);
    const freshCache = allocateKvCache(model.config, 8, 8);
    const scratch = new ForwardScratch(model.config);
    const first = forward(model, refKernels, batchOf(PROMPT, 0), scratchCache, null, scratch);
    const firstCopy = first.slice();
    expect(Array.from(firstCopy)).toEqual(Array.from(forward(model, refKernels, batchOf(PROMPT, 0), freshCache, null)));
    const second = forward(model, refKernels, batchOf([7], PROMPT.length), scratchCache, null, scratch);
    expect(second.buffer).toBe(first.buffer); // one buffer, no allocation per step
    expect(Array.from(second)).toEqual(Array.from(forward(model, refKernels, batchOf([7], PROMPT.length), freshCache, null)));
    expect(Array.from(first)).not.toEqual(Array.from(firstCopy)); // the earlier view now holds the later step's logits
    // more than 64 MiB of logits: not kept by the scratch
    const rows = Math.floor((64 * 2 ** 20) / (model.config.vocabSize * 4)) + 1;
    const big = scratch.logitsFor(rows);
    expect(big.length).toBe(rows * model.config.vocabSize);
    expect(big.buffer).not.toBe(first.buffer);
    expect(scratch.logitsFor(1).buffer).toBe(first.buffer);
  });

  it('decode steps after a prefill give the logits of a full prefill of the longer sequence', async () => {
    const model = await tinyModel({ arch: 'qwen2' });
    const full = runSequence(model, refKernels, PROMPT, PROMPT.length);
    const stepped = runSequence(model, refKernels, PROMPT, 4);
    for (let i = 0; i < PROMPT.length; i++) expect(maxAbsDiff(stepped[i]!, full[i]!)).toBeLessThan(1e-4);
  });

  it('a mixed batch (prefill + decode rows, scattered blocks) equals each sequence run alone', async () => {
    const model = await tinyModel({ tied: true });
    const blockSize = 2;
    const a = PROMPT.slice(0, 7);
    const b = [9, 8, 7];
    const aloneA = runSequence(model, refKernels, [...a, 100], a.length, null, blockSize);
    const aloneB = runSequence(model, refKernels, b, b.length, null, blockSize);
    // step 1: prefill of a only, blocks 5, 1, 7, 3; step 2: decode of a + prefill of b (blocks 0, 6)
    const cache = allocateKvCache(model.config, 8, blockSize);
    const tableA = [5, 1, 7, 3, 2];
    const first: ForwardBatch = {
      tokens: Int32Array.from(a), positions: Int32Array.from(a.keys()), seqs: 1,
      qStart: Int32Array.of(0), qLen: Int32Array.of(a.length), ctxLen: Int32Array.of(a.length),
      blockTable: Int32Array.from(tableA), blockTableStart: Int32Array.of(0), logitRows: Int32Array.of(a.length - 1),
    };
    const firstLogits = forward(model, refKernels, first, cache, null);
    expect(maxAbsDiff(firstLogits, aloneA[a.length - 1]!)).toBeLessThan(1e-4);
    const second: ForwardBatch = {
      tokens: Int32Array.of(100, ...b), positions: Int32Array.of(a.length, 0, 1, 2), seqs: 2,
      qStart: Int32Array.of(0, 1), qLen: Int32Array.of(1, 3), ctxLen: Int32Array.of(a.length + 1, 3),
      blockTable: Int32Array.of(6, 0, ...tableA), blockTableStart: Int32Array.of(2, 0), logitRows: Int32Array.of(0, 2, 3),
    };
    const vocab = model.config.vocabSize;
    const logits = forward(model, refKernels, second, cache, null);
    expect(maxAbsDiff(logits.subarray(0, vocab), aloneA[a.length]!)).toBeLessThan(1e-4);
    expect(maxAbsDiff(logits.subarray(vocab, 2 * vocab), aloneB[1]!)).toBeLessThan(1e-4);
    expect(maxAbsDiff(logits.subarray(2 * vocab), aloneB[2]!)).toBeLessThan(1e-4);
  });

  it('runs a Llama-3 rope-scaled model consistently, and the scaling changes its output', async () => {
    const ropeScaling = { factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 64 };
    const scaled = await tinyModel({ seed: 4, ropeScaling });
    expect(scaled.config.ropeScaling).toMatchObject({ ropeType: 'llama3', factor: 8 });
    const plain = await tinyModel({ seed: 4 });
    const full = runSequence(scaled, refKernels, PROMPT, PROMPT.length);
    const stepped = runSequence(scaled, refKernels, PROMPT, 3);
    const unscaled = runSequence(plain, refKernels, PROMPT, PROMPT.length);
    for (let i = 0; i < PROMPT.length; i++) expect(maxAbsDiff(stepped[i]!, full[i]!)).toBeLessThan(1e-4);
    expect(maxAbsDiff(full[PROMPT.length - 1]!, unscaled[PROMPT.length - 1]!)).toBeGreaterThan(1e-3);
  });

  it('refuses a malformed batch instead of corrupting the cache', async () => {
    const model = await tinyModel();
    const cache = allocateKvCache(model.config, 2, 4);
    const batch = contiguousBatch([{ tokens: [1, 2, 3], pastLength: 0, firstBlock: 0 }], 4);
    expect(() => forward(model, refKernels, { ...batch, blockTable: Int32Array.of(9) }, cache, null)).toThrow(/block 0 is 9, cache has 2/);
    expect(() => forward(model, refKernels, { ...batch, positions: Int32Array.of(0, 1, 5) }, cache, null)).toThrow(/position 5, expected 2/);
    expect(() => forward(model, refKernels, { ...batch, tokens: Int32Array.of(1, 2, 512) }, cache, null)).toThrow(/token id 512 .* \[0, 512\)/);
  });
});

const DTYPES = ['f32', 'bf16', 'f16'] as const;
const nativeSets = supportedNativeKernelSets();

describe.each(DTYPES)('native kernels vs reference on the tiny model in %s', (dtype) => {
  it.skipIf(nativeSets.length === 0)('prefill and decode logits agree', async () => {
    for (const arch of ['llama', 'qwen2'] as const) {
      const model = await tinyModel({ dtype, arch, seed: 3 });
      const reference = runSequence(model, refKernels, PROMPT, 6);
      for (const kernels of nativeSets) {
        const native = runSequence(model, kernels, PROMPT, 6);
        for (let i = 0; i < PROMPT.length; i++) {
          expect(maxAbsDiff(native[i]!, reference[i]!), `${kernels.name} ${arch} row ${i}`).toBeLessThan(1e-3 * Math.max(1, maxAbs(reference[i]!)));
        }
      }
    }
  });
});

describe('adapter hook at the model level', () => {
  const RANK = 3;
  const SCALE = 2.5;
  const TARGETS: { layer: number; module: TargetModule }[] = [
    { layer: 0, module: 'q_proj' }, { layer: 0, module: 'v_proj' }, { layer: 1, module: 'o_proj' },
    { layer: 1, module: 'gate_proj' }, { layer: 0, module: 'down_proj' }, { layer: 1, module: 'k_proj' }, { layer: 0, module: 'up_proj' },
  ];
  const FIELD: Record<TargetModule, keyof LayerWeights> = { q_proj: 'q', k_proj: 'k', v_proj: 'v', o_proj: 'o', gate_proj: 'gate', up_proj: 'up', down_proj: 'down' };

  it('a hook giving s·B·A equals merged weights W + s·B·A, in prefill and decode, reference and native', async () => {
    const base = await tinyModel({ arch: 'qwen2', seed: 7 });
    const random = new Random(11);
    const factors = new Map<string, { a: Float32Array; b: Float32Array; n: number; k: number }>();
    for (const { layer, module } of TARGETS) {
      const w = (base.weights.layers[layer]![FIELD[module]] as LinearWeights).weight;
      factors.set(`${layer}.${module}`, { a: random.fillNormal(new Float32Array(RANK * w.cols), 0.3), b: random.fillNormal(new Float32Array(w.rows * RANK), 0.3), n: w.rows, k: w.cols });
    }
    // the hook: raw LoRA segments over every row, scale folded into B
    const slots = new Map<string, AdapterSlot>();
    for (const [key, f] of factors) {
      // bt: [RANK, n] = (s·B)ᵀ
      const scaledBt = new Float32Array(RANK * f.n);
      for (let o = 0; o < f.n; o++) for (let j = 0; j < RANK; j++) scaledBt[j * f.n + o] = f.b[o * RANK + j]! * SCALE;
      slots.set(key, { segments: [{ start: 0, end: 0, a: weightMatrix('f32', RANK, f.k, f.a), bt: weightMatrix('f32', RANK, f.n, scaledBt) }], cores: [] });
    }
    const asked: string[] = [];
    const hook: AdapterHook = (layer, module, m) => {
      asked.push(`${layer}.${module}`);
      const slot = slots.get(`${layer}.${module}`);
      return slot ? { segments: slot.segments.map((segment) => ({ ...segment, end: m })), cores: [] } : null;
    };
    // the merged model: W' = W + s·B·A (f32)
    const layers = base.weights.layers.map((layer, l) => {
      const merged: Record<string, unknown> = { ...layer };
      for (const [field, linear] of Object.entries(layer)) {
        const module = (Object.keys(FIELD) as TargetModule[]).find((name) => FIELD[name] === field);
        const f = module && factors.get(`${l}.${module}`);
        if (!f) continue;
        const w = (linear as LinearWeights).weight;
        const data = Float32Array.from(w.data as Float32Array);
        refKernels.gemmF32(false, false, f.n, f.k, RANK, SCALE, f.b, RANK, f.a, f.k, 1, data, f.k);
        merged[field] = { weight: weightMatrix('f32', f.n, f.k, data), bias: (linear as LinearWeights).bias };
      }
      return merged as unknown as LayerWeights;
    });
    const mergedModel = createLlamaModel(base.config, { ...base.weights, layers });
    const withHook = runSequence(base, refKernels, PROMPT, 5, hook);
    const withMerged = runSequence(mergedModel, refKernels, PROMPT, 5);
    const withoutAdapter = runSequence(base, refKernels, PROMPT, 5);
    for (let i = 0; i < PROMPT.length; i++) {
      expect(maxAbsDiff(withHook[i]!, withMerged[i]!)).toBeLessThan(1e-4 * Math.max(1, maxAbs(withMerged[i]!)));
      // the adapter really changes the output (the comparison above is not vacuous)
      expect(maxAbsDiff(withHook[i]!, withoutAdapter[i]!)).toBeGreaterThan(1e-2);
    }
    // the forward pass asks for every targeted linear of every layer
    expect(new Set(asked).size).toBe(base.config.numLayers * 7);
    // the native kernels' fused matmulLora gives the same model
    for (const kernels of supportedNativeKernelSets()) {
      const nativeHook = runSequence(base, kernels, PROMPT, 5, hook);
      const nativeMerged = runSequence(mergedModel, kernels, PROMPT, 5);
      for (let i = 0; i < PROMPT.length; i++) {
        expect(maxAbsDiff(nativeHook[i]!, nativeMerged[i]!), kernels.name).toBeLessThan(1e-4 * Math.max(1, maxAbs(nativeMerged[i]!)));
      }
    }
  });
});
