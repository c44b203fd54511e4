/**
 * The node-llama-cpp peer for the engine benchmark: the same generated weights exported to GGUF
 * (src/io/gguf), loaded by node-llama-cpp 3.21.1 on the CPU (its prebuilt @node-llama-cpp/linux-x64
 * binary, gpu: false, NODE_LLAMA_CPP_SKIP_DOWNLOAD=true, never built or downloaded at run time), and
 * decoded greedily from a fixed prompt for a fixed number of tokens:
 *   batch 1     one sequence in one context
 *   batch 8     8 sequences in one context (node-llama-cpp batches them into one llama_decode)
 *   adapters    32 distinct GGUF LoRA adapters, one context per adapter (what node-llama-cpp offers:
 *               LoRA is a per-context option), all 32 requests running concurrently
 * Decode tok/s = tokens generated after the last sequence's first token / the time since then.
 *
 * node-llama-cpp is installed on demand into bench/.peers/node-llama-cpp (its own prefix, so the
 * --no-save installs of other peers in bench/.peers do not prune it); when it cannot be had the peer
 * answers available: false with the reason.
 *
 * `checkLlamaCppGreedy` is the exporter's end-to-end check: llama.cpp's greedy tokens on a model (and
 * optionally one LoRA adapter) against SOPPU's engine for the same prompt ids.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { createEngine } from '../../src/engine/engine.js';
import { BASE_SHAPES, type BaseShape } from '../../src/io/fixtures/base-shapes.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { adapterDirName, writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { exportGgufLora } from '../../src/io/gguf/export-gguf-lora.js';
import { exportGgufModel, type GgufOutputType } from '../../src/io/gguf/export-gguf-model.js';

export const NODE_LLAMA_CPP_VERSION = '3.21.1';

/* The slice of node-llama-cpp's API used here (the package is not a dependency, so no types). */
interface NlcSequence {
  evaluate(tokens: number[], options?: { temperature?: number }): AsyncGenerator<number, void, void>;
  clearHistory(): Promise<void>;
  dispose(): void;
}
interface NlcContext {
  getSequence(): NlcSequence;
  dispose(): Promise<void>;
}
interface NlcModel {
  createContext(options: Record<string, unknown>): Promise<NlcContext>;
  tokenize(text: string, specialTokens?: boolean): number[];
  dispose(): Promise<void>;
}
interface NlcLlama {
  loadModel(options: Record<string, unknown>): Promise<NlcModel>;
  dispose(): Promise<void>;
  readonly buildType: string;
}
interface NlcModule {
  getLlama(options: Record<string, unknown>): Promise<NlcLlama>;
}

export interface LlamaCppPeerOptions {
  /** Repository root (bench/.peers and bench/out live under it). */
  readonly root: string;
  /** HF model folders to measure, by label (e.g. { bf16: dir, f32: dir }); exported to GGUF in their stored dtype. */
  readonly models: Readonly<Record<string, string>>;
  /** llama.cpp threads (default SOPPU_THREADS or 2). */
  readonly threads?: number;
  /** Default [1, 8]. */
  readonly batchSizes?: readonly number[];
  /** PEFT dirs for the distinct-adapters case (one context per adapter); measured on the first model. */
  readonly adapters?: readonly string[];
  /** Prompt token ids (default: 16 fixed ids below 256). */
  readonly prompt?: readonly number[];
  /** Tokens generated per sequence (default 16). */
  readonly tokens?: number;
  /** Timed runs per batch size and thread count; the best is reported (default 3). */
  readonly rounds?: number;
  readonly log?: (line: string) => void;
}

export interface LlamaCppPeerResult {
  readonly available: boolean;
  readonly reason?: string;
  readonly version: string;
  /** One row per (model, batch): decode tokens/s summed over the batch, best of the rounds and thread counts, and its threads. */
  readonly results: { model: string; batch: number; tokensPerSecond: number; threads: number }[];
  /** The distinct-adapters case: adapters, contexts, decode tokens/s summed over them (the better thread count). */
  readonly adapters?: { model: string; adapters: number; tokensPerSecond: number; threads: number };
}

/** Imports node-llama-cpp from bench/.peers/node-llama-cpp, installing it first when missing. */
export async function loadNodeLlamaCpp(root: string, log: (line: string) => void = () => undefined): Promise<{ module: NlcModule | null; error: string | null }> {
  process.env['NODE_LLAMA_CPP_SKIP_DOWNLOAD'] = 'true';
  const prefix = join(root, 'bench', '.peers', 'node-llama-cpp');
  const entry = join(prefix, 'node_modules', 'node-llama-cpp', 'dist', 'index.js');
  try {
    if (!existsSync(entry)) {
      mkdirSync(prefix, { recursive: true });
      log(`installing node-llama-cpp@${NODE_LLAMA_CPP_VERSION} into bench/.peers/node-llama-cpp (~730 MB, npm registry only) …`);
      execFileSync('npm', ['install', '--prefix', prefix, `node-llama-cpp@${NODE_LLAMA_CPP_VERSION}`, '--no-save', '--no-audit', '--no-fund'], {
        stdio: ['ignore', 'ignore', 'pipe'],
        timeout: 900_000,
        env: { ...process.env, NODE_LLAMA_CPP_SKIP_DOWNLOAD: 'true' },
      });
    }
    if (!existsSync(join(prefix, 'node_modules', '@node-llama-cpp', `${process.platform}-${process.arch}`))) {
      return { module: null, error: `no prebuilt @node-llama-cpp/${process.platform}-${process.arch} binary (building llama.cpp from source is not attempted)` };
    }
    return { module: (await import(pathToFileURL(entry).href)) as NlcModule, error: null };
  } catch (error) {
    return { module: null, error: error instanceof Error ? error.message.split('\n')[0]! : String(error) };
  }
}

async function isNewer(file: string, than: string): Promise<boolean> {
  try {
    return (await stat(file)).mtimeMs >= (await stat(than)).mtimeMs;
  } catch {
    return false;
  }
}

/** Exports `modelDir` to bench/.peers/gguf/<label>-<folder>.gguf unless an up-to-date export exists. */
export async function ggufOfModel(root: string, label: string, modelDir: string, type?: GgufOutputType): Promise<string> {
  const dir = join(root, 'bench', '.peers', 'gguf');
  mkdirSync(dir, { recursive: true });
  // the folder name is part of the file name: two model folders never share an export
  const out = join(dir, `${label}-${basename(modelDir)}.gguf`);
  if (!(await isNewer(out, join(modelDir, 'config.json'))) || !(await isNewer(out, join(modelDir, 'tokenizer.json')))) {
    await exportGgufModel({ modelDir, out, ...(type ? { type } : {}) });
  }
  return out;
}

const DEFAULT_PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104];

/** Greedy decode of `count` tokens per sequence, all sequences concurrently; returns tokens/s after the first tokens and the tokens. */
async function decodeConcurrently(sequences: readonly NlcSequence[], prompt: readonly number[], count: number): Promise<{ tokensPerSecond: number; tokens: number[][] }> {
  const tokenTimes: number[][] = sequences.map(() => []);
  const tokens: number[][] = sequences.map(() => []);
  await Promise.all(
    sequences.map(async (sequence, i) => {
      for await (const token of sequence.evaluate([...prompt], { temperature: 0 })) {
        tokens[i]!.push(token);
        tokenTimes[i]!.push(performance.now());
        if (tokens[i]!.length >= count) break;
      }
    }),
  );
  const end = performance.now();
  // the window opens when the last sequence has its first token; only tokens made inside it count
  // (concurrent contexts start decoding while later ones are still in prefill)
  const start = Math.max(...tokenTimes.map((times) => times[0]!));
  const decoded = tokenTimes.reduce((sum, times) => sum + times.filter((t) => t > start).length, 0);
  return { tokensPerSecond: decoded / ((end - start) / 1000), tokens };
}

function threadsOf(options: { threads?: number }): number {
  return options.threads ?? (Number(process.env['SOPPU_THREADS']) || 2);
}

/** Runs the node-llama-cpp peer; never throws for a missing peer (available: false with the reason). */
export async function runLlamaCppPeer(options: LlamaCppPeerOptions): Promise<LlamaCppPeerResult> {
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const loaded = await loadNodeLlamaCpp(options.root, log);
  if (!loaded.module) return { available: false, reason: loaded.error ?? 'unknown', version: NODE_LLAMA_CPP_VERSION, results: [] };
  const threads = threadsOf(options);
  // the peer at its best: with as many threads as cores, llama.cpp's spinning workers share the cores with
  // Node's own thread, and single steps of this small model took 3–5× their usual time (SmolLM-135M bf16,
  // batch 1, 2 threads: steps of 9 ms and of 30–55 ms in one run; 1 thread: 10.4–11.6 ms)
  const threadCounts = [...new Set([threads, 1])];
  const rounds = options.rounds ?? 3;
  const batchSizes = options.batchSizes ?? [1, 8];
  const prompt = options.prompt ?? DEFAULT_PROMPT;
  const count = options.tokens ?? 16;
  const contextSize = 2 ** Math.ceil(Math.log2(prompt.length + count + 16));
  const llama = await loaded.module.getLlama({ gpu: false, build: 'never', logLevel: 'error' });
  const results: LlamaCppPeerResult['results'] = [];
  let adapters: LlamaCppPeerResult['adapters'];
  try {
    const labels = Object.keys(options.models);
    for (const label of labels) {
      const file = await ggufOfModel(options.root, label, options.models[label]!);
      const model = await llama.loadModel({ modelPath: file, gpuLayers: 0, useMmap: true });
      try {
        for (const batch of batchSizes) {
          let best = { tokensPerSecond: 0, threads };
          for (const contextThreads of threadCounts) {
            const context = await model.createContext({ contextSize: contextSize * batch, sequences: batch, threads: contextThreads, batchSize: Math.max(prompt.length * batch, 512) });
            try {
              const sequences = Array.from({ length: batch }, () => context.getSequence());
              await decodeConcurrently(sequences, prompt, 2); // warm-up
              for (let round = 0; round < rounds; round++) {
                for (const s of sequences) await s.clearHistory();
                const { tokensPerSecond } = await decodeConcurrently(sequences, prompt, count);
                log(`node-llama-cpp ${label} batch ${batch} threads ${contextThreads} round ${round}: ${tokensPerSecond.toFixed(2)} tok/s`);
                if (tokensPerSecond > best.tokensPerSecond) best = { tokensPerSecond, threads: contextThreads };
              }
            } finally {
              await context.dispose();
            }
          }
          results.push({ model: label, batch, ...best });
        }
        if (options.adapters && options.adapters.length > 0 && label === labels[0]) {
          const dir = join(options.root, 'bench', '.peers', 'gguf', `${label}-adapters`);
          mkdirSync(dir, { recursive: true });
          const files: string[] = [];
          for (let i = 0; i < options.adapters.length; i++) {
            const out = join(dir, `adapter-${i}.gguf`);
            await exportGgufLora({ modelDir: options.models[label]!, adapterDir: options.adapters[i]!, out });
            files.push(out);
          }
          for (const contextThreads of threadCounts) {
            const contexts: NlcContext[] = [];
            try {
              for (const filePath of files) contexts.push(await model.createContext({ contextSize, sequences: 1, threads: contextThreads, lora: { adapters: [{ filePath }] } }));
              const sequences = contexts.map((c) => c.getSequence());
              await decodeConcurrently(sequences, prompt, 2); // warm-up
              for (const s of sequences) await s.clearHistory();
              const { tokensPerSecond } = await decodeConcurrently(sequences, prompt, count);
              log(`node-llama-cpp ${label} ${contexts.length} adapters (one context each, concurrent), threads ${contextThreads}: ${tokensPerSecond.toFixed(2)} tok/s`);
              if (!adapters || tokensPerSecond > adapters.tokensPerSecond) adapters = { model: label, adapters: contexts.length, tokensPerSecond, threads: contextThreads };
            } finally {
              for (const c of contexts) await c.dispose();
            }
          }
        }
      } finally {
        await model.dispose();
      }
    }
  } catch (error) {
    return { available: false, reason: `node-llama-cpp failed: ${error instanceof Error ? error.message.split('\n')[0] : String(error)}`, version: NODE_LLAMA_CPP_VERSION, results };
  } finally {
    await llama.dispose();
  }
  return { available: true, version: NODE_LLAMA_CPP_VERSION, results, ...(adapters ? { adapters } : {}) };
}

export interface GreedyCheck {
  readonly available: boolean;
  readonly reason?: string;
  readonly prompt: readonly number[];
  readonly soppu: readonly number[];
  readonly llamaCpp: readonly number[];
  /** Leading tokens on which both agree. */
  readonly matching: number;
}

/**
 * Greedy tokens of llama.cpp (the exported GGUF, plus the adapter as a GGUF LoRA when given) against
 * SOPPU's engine for the same prompt ids. Validates the exporter end to end.
 */
export async function checkLlamaCppGreedy(options: { root: string; modelDir: string; label: string; adapterDir?: string; prompt?: readonly number[]; tokens?: number; threads?: number }): Promise<GreedyCheck> {
  const prompt = options.prompt ?? DEFAULT_PROMPT;
  const count = options.tokens ?? 8;
  const engine = await createEngine({ modelDir: options.modelDir, kvBudgetBytes: 64 << 20, adapterBudgetBytes: 64 << 20, maxBatchTokens: 256, maxRunningRequests: 4, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 16, seed: 1 });
  const soppu: number[] = [];
  try {
    const adapter = options.adapterDir ? { adapterId: 'checked', adapterSource: 'local' as const, adapterPath: options.adapterDir } : {};
    for await (const event of engine.generate({ prompt, maxNewTokens: count, ignoreEos: true, sampling: { temperature: 0 }, ...adapter })) {
      if (event.type === 'token') soppu.push(event.token.id);
    }
  } finally {
    await engine.close();
  }
  const loaded = await loadNodeLlamaCpp(options.root);
  if (!loaded.module) return { available: false, reason: loaded.error ?? 'unknown', prompt, soppu, llamaCpp: [], matching: 0 };
  const llama = await loaded.module.getLlama({ gpu: false, build: 'never', logLevel: 'error' });
  try {
    const file = await ggufOfModel(options.root, options.label, options.modelDir);
    const model = await llama.loadModel({ modelPath: file, gpuLayers: 0 });
    try {
      let lora: Record<string, unknown> = {};
      if (options.adapterDir) {
        const out = join(options.root, 'bench', '.peers', 'gguf', `${options.label}-checked-adapter.gguf`);
        await exportGgufLora({ modelDir: options.modelDir, adapterDir: options.adapterDir, out });
        lora = { lora: { adapters: [{ filePath: out }] } };
      }
      const context = await model.createContext({ contextSize: 256, sequences: 1, threads: threadsOf(options), ...lora });
      try {
        const { tokens } = await decodeConcurrently([context.getSequence()], prompt, count);
        const llamaCpp = tokens[0]!;
        let matching = 0;
        while (matching < count && soppu[matching] === llamaCpp[matching]) matching++;
        return { available: true, prompt, soppu, llamaCpp, matching };
      } finally {
        await context.dispose();
      }
    } finally {
      await model.dispose();
    }
  } finally {
    await llama.dispose();
  }
}

/** Greedy-token check of the exporter on a tiny generated model, without and with one LoRA adapter. */
export async function exporterCheck(root: string): Promise<{ base: GreedyCheck; adapter: GreedyCheck }> {
  const modelDir = join(root, 'bench', 'out', 'peer-check-tiny-f32');
  if (!existsSync(join(modelDir, 'model.safetensors'))) await generateModel({ out: modelDir, shape: 'tiny', dtype: 'f32', seed: 3 });
  const adapterRoot = join(root, 'bench', 'out', 'peer-check-tiny-adapter');
  let adapterDir = join(adapterRoot, adapterDirName(0));
  if (!existsSync(join(adapterDir, 'adapter_model.safetensors'))) {
    [adapterDir] = (await writeGeneratedAdapters(adapterRoot, 1, { base: BASE_SHAPES.tiny, rank: 4, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed: 5, deltaStd: 0.2 })) as [string];
  }
  const base = await checkLlamaCppGreedy({ root, modelDir, label: 'peer-check-tiny-f32', tokens: 8 });
  const adapter = await checkLlamaCppGreedy({ root, modelDir, label: 'peer-check-tiny-f32', adapterDir, tokens: 8 });
  return { base, adapter };
}

/** What bench/engine.ts passes to get its node-llama-cpp section. */
export interface LlamaCppSectionOptions {
  readonly root: string;
  /** HF model folders by dtype label, the same ones the engine measured. */
  readonly models: Readonly<Record<string, string>>;
  readonly batchSizes: readonly number[];
  /** The engine's raw adapters, written as PEFT dirs (same generator, seed and shapes) for the distinct-adapters case. */
  readonly adapters?: { readonly base: BaseShape; readonly rank: number; readonly targets: readonly string[]; readonly seed: number; readonly count: number };
  readonly tokens?: number;
  readonly threads?: number;
  readonly log?: (line: string) => void;
}

/** Runs the peer and returns markdown lines for BENCHMARKS.md (or the line saying why it was skipped). */
export async function llamaCppPeerSection(options: LlamaCppSectionOptions): Promise<string[]> {
  try {
    return await peerSection(options);
  } catch (error) {
    // the engine benchmark's own results must survive a failing peer
    return [`node-llama-cpp ${NODE_LLAMA_CPP_VERSION} peer: failed (${error instanceof Error ? error.message.split('\n')[0] : String(error)}).`];
  }
}

async function peerSection(options: LlamaCppSectionOptions): Promise<string[]> {
  let adapterDirs: string[] | undefined;
  if (options.adapters && options.adapters.count > 0) {
    const a = options.adapters;
    const dir = join(options.root, 'bench', 'out', `peer-adapters-l${a.base.numHiddenLayers}-r${a.rank}-s${a.seed}-${a.targets.join('_')}`);
    adapterDirs = Array.from({ length: a.count }, (_, i) => join(dir, adapterDirName(i)));
    if (!adapterDirs.every((d) => existsSync(join(d, 'adapter_model.safetensors')))) {
      adapterDirs = await writeGeneratedAdapters(dir, a.count, { base: a.base, rank: a.rank, targets: a.targets, seed: a.seed }, { dtype: 'f32' });
    }
  }
  const threads = threadsOf(options);
  const tokens = options.tokens ?? 16;
  const result = await runLlamaCppPeer({ root: options.root, models: options.models, batchSizes: options.batchSizes, threads, tokens, ...(adapterDirs ? { adapters: adapterDirs } : {}), ...(options.log ? { log: options.log } : {}) });
  if (!result.available) return [`node-llama-cpp ${result.version} peer: skipped (${result.reason}).`];
  const checks = await exporterCheck(options.root);
  const lines = [
    `Exporter check (tiny f32 model, greedy, same prompt ids): llama.cpp's first ${checks.base.soppu.length} tokens match SOPPU's on ${checks.base.matching} (base) and ${checks.adapter.matching} (with a rank-4 LoRA on all seven modules, as a GGUF LoRA adapter).`,
    '',
    `node-llama-cpp ${result.version} peer (prebuilt CPU binary, gpu: false; the same weights exported with \`soppu export-gguf\`; greedy, ${tokens} tokens per sequence, decode tok/s = tokens made after the last sequence's first token / time since; batch B = B sequences in one context; each row the best of ${threads > 1 ? `${threads} and 1 threads per context, ` : ''}3 timed runs (one for the adapters row), its threads named):`,
    '',
    '| model | batch | threads | node-llama-cpp tok/s |',
    '|---|---|---|---|',
    ...result.results.map((r) => `| ${r.model} | ${r.batch} | ${r.threads} | ${r.tokensPerSecond.toFixed(2)} |`),
  ];
  if (result.adapters) {
    lines.push(`| ${result.adapters.model}, ${result.adapters.adapters} distinct LoRA adapters (one context per adapter, all concurrent) | ${result.adapters.adapters} | ${result.adapters.threads} | ${result.adapters.tokensPerSecond.toFixed(2)} |`);
  }
  return lines;
}
