/**
 * Shared helpers for the model tests: generated tiny models in a temp folder, and a plain
 * single-sequence runner over the paged cache.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import type { GenerateModelOptions } from '../../src/io/fixtures/generate-model.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import type { KernelSet } from '../../src/kernels/kernel-set.js';
import type { AdapterHook } from '../../src/model/adapter-hook.js';
import { allocateKvCache, contiguousBatch, forward } from '../../src/model/forward.js';
import type { LlamaModel } from '../../src/model/llama-model.js';
import { loadLlamaModel } from '../../src/model/llama-model.js';

const generated = new Map<string, Promise<string>>();
const created: string[] = [];

/** A fresh temp folder, removed after the test file. */
export async function tempDir(prefix = 'soppu-model-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  created.push(dir);
  return dir;
}

afterAll(async () => {
  for (const dir of created.splice(0)) await rm(dir, { recursive: true, force: true });
  generated.clear();
});

/** Generate (once per test file and options) a model folder and return its path. */
export function modelDir(options: Omit<GenerateModelOptions, 'out'> = {}): Promise<string> {
  const key = JSON.stringify(options);
  let dir = generated.get(key);
  if (!dir) {
    dir = (async () => {
      const out = await tempDir();
      await generateModel({ ...options, out });
      return out;
    })();
    generated.set(key, dir);
  }
  return dir;
}

export async function tinyModel(options: Omit<GenerateModelOptions, 'out'> = {}): Promise<LlamaModel> {
  return loadLlamaModel(await modelDir(options));
}

/**
 * Logits of every position of `tokens` run as one sequence: prefill of the first `prefill` tokens,
 * then one decode step per remaining token. Returns [tokens.length, vocab] rows.
 */
export function runSequence(model: LlamaModel, kernels: KernelSet, tokens: readonly number[], prefill: number, hook: AdapterHook | null = null, blockSize = 4): Float32Array[] {
  const cache = allocateKvCache(model.config, Math.ceil(tokens.length / blockSize) + 1, blockSize);
  const vocab = model.config.vocabSize;
  const rows: Float32Array[] = [];
  const first = forward(model, kernels, contiguousBatch([{ tokens: tokens.slice(0, prefill), pastLength: 0, firstBlock: 0 }], blockSize, 'all'), cache, hook);
  for (let i = 0; i < prefill; i++) rows.push(first.subarray(i * vocab, (i + 1) * vocab));
  for (let t = prefill; t < tokens.length; t++) {
    rows.push(forward(model, kernels, contiguousBatch([{ tokens: [tokens[t]!], pastLength: t, firstBlock: 0 }], blockSize), cache, hook));
  }
  return rows;
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!));
  return a.length === b.length ? max : Infinity;
}

export function maxAbs(a: Float32Array): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]!));
  return max;
}

export function argmax(a: Float32Array): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i]! > a[best]!) best = i;
  return best;
}
