/**
 * Engine benchmark: decode tokens/s of a SmolLM-135M-shaped model (generated weights, f32 and bf16)
 * at several batch sizes, for three row mixes measured in the same run:
 *   base        every row the base model (the peer: the same engine with no adapters)
 *   raw         every row a distinct raw LoRA adapter (rank r over --targets)
 *   compressed  every row a distinct compressed adapter from an in-memory bank of --bank-size ids
 *               (--clusters clusters, shared rank --shared-rank, full cores)
 * plus batch-1 decode time against the bandwidth roofline (weight bytes / measured read bandwidth),
 * and the resident-set growth with --rss-adapters adapters resident, raw vs compressed (each in its
 * own child process).
 *
 *   npm run bench -- engine [--dtypes f32,bf16] [--batches 1,8,32,64] [--steps 8] [--rounds 3] [--layers N]
 *                           [--rank 8] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
 *                           [--bank-size 1000] [--clusters 4] [--shared-rank 16] [--rank-sweep 16,32,64] [--rss-adapters 1000]
 *                           [--rss-targets q_proj,v_proj] [--no-write]
 *
 * The compressed bank is synthesised in memory with the shapes the compressor writes (U, Σ, Vᵀ):
 * its speed does not depend on the values. node-llama-cpp (bench/peers/llama-cpp.ts) runs the same weights and adapters exported to GGUF.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BankReader } from '../src/compress/bank-reader-types.js';
import { AdapterCache } from '../src/engine/adapter-cache.js';
import { adapterDtypes, createEngine, slotShapeOf } from '../src/engine/engine.js';
import type { Engine, GenerateRequest } from '../src/engine/engine-types.js';
import { BASE_SHAPES } from '../src/io/fixtures/base-shapes.js';
import { AdapterGenerator } from '../src/io/fixtures/generate-adapters.js';
import { generateModel } from '../src/io/fixtures/generate-model.js';
import type { LoraAdapter } from '../src/io/lora-types.js';
import { getKernels } from '../src/kernels/index.js';
import { loadNativeAddon } from '../src/kernels/native-addon.js';
import { TARGET_MODULES, type TargetModule } from '../src/model/adapter-hook.js';
import type { LlamaConfig } from '../src/model/llama-config.js';
import { loadLlamaModel, modelWeightBytes, modelWeightDtype, type LlamaModel } from '../src/model/llama-model.js';
import { WEIGHT_DTYPE_BYTES } from '../src/tensor/dtype.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { syntheticBank, syntheticBankId } from './helpers/synthetic-bank.js';
import { fmt, median, medianRange } from './helpers/timing.js';
import { llamaCppPeerSection } from './peers/llama-cpp.js';

type Mode = 'base' | 'raw' | 'compressed';

interface Args {
  dtypes: ('f32' | 'bf16')[];
  batches: number[];
  steps: number;
  rounds: number;
  layers: number | undefined;
  rank: number;
  targets: TargetModule[];
  bankSize: number;
  clusters: number;
  sharedRank: number;
  /** Shared ranks of the batch-32 compressed sweep (0 entries: none). */
  rankSweep: number[];
  rssAdapters: number;
  rssTargets: TargetModule[];
  write: boolean;
  rssChild: Mode | null;
}

export function parseArgs(argv: readonly string[]): Args {
  const value = (name: string): string | undefined => {
    const at = argv.indexOf(`--${name}`);
    return at >= 0 ? argv[at + 1] : argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
  };
  const list = (name: string, fallback: string): string[] => (value(name) ?? fallback).split(',').filter(Boolean);
  const targets = list('targets', TARGET_MODULES.join(','));
  for (const t of targets) if (!TARGET_MODULES.includes(t as TargetModule)) throw new Error(`--targets: unknown module ${t}`);
  return {
    dtypes: list('dtypes', 'f32,bf16') as ('f32' | 'bf16')[],
    batches: list('batches', '1,8,32,64').map(Number),
    steps: Number(value('steps') ?? 8),
    rounds: Number(value('rounds') ?? 3),
    layers: value('layers') ? Number(value('layers')) : undefined,
    rank: Number(value('rank') ?? 8),
    targets: targets as TargetModule[],
    bankSize: Number(value('bank-size') ?? 1000),
    clusters: Number(value('clusters') ?? 4),
    sharedRank: Number(value('shared-rank') ?? 16),
    rankSweep: list('rank-sweep', '16,32,64').map(Number),
    rssAdapters: Number(value('rss-adapters') ?? 1000),
    rssTargets: list('rss-targets', 'q_proj,v_proj') as TargetModule[],
    write: !argv.includes('--no-write'),
    rssChild: (value('rss-child') as Mode | undefined) ?? null,
  };
}

const here = dirname(fileURLToPath(import.meta.url));

async function modelDir(root: string, dtype: 'f32' | 'bf16', layers: number | undefined): Promise<string> {
  const dir = join(root, 'bench', 'out', `smollm-135m-${dtype}${layers ? `-l${layers}` : ''}`);
  if (!existsSync(join(dir, 'config.json'))) {
    process.stderr.write(`generating ${dir}\n`);
    await generateModel({ out: dir, shape: 'smollm-135m', dtype, seed: 1, ...(layers ? { numLayers: layers } : {}) });
  }
  return dir;
}

/** Raw adapters generated on demand (no disk), the generator's own seeded stream per index. */
export function rawLoader(config: LlamaConfig, args: Args): (dir: string) => Promise<LoraAdapter> {
  const generator = new AdapterGenerator({ base: { ...BASE_SHAPES['smollm-135m'], numHiddenLayers: config.numLayers }, rank: args.rank, targets: args.targets, seed: 3 });
  return async (dir) => generator.adapter(Number(dir.slice(dir.lastIndexOf('-') + 1)));
}

/** The engine bench's bank: adapters u0000… */
function benchBank(config: LlamaConfig, args: Pick<Args, 'targets' | 'sharedRank' | 'clusters' | 'bankSize'>): BankReader {
  return syntheticBank(config, { ...args, idPrefix: 'u' });
}

function requestFor(mode: Mode, index: number, maxNewTokens: number): GenerateRequest {
  const prompt = Array.from({ length: 16 }, (_, i) => 100 + ((index * 31 + i * 7) % 1000));
  const adapter: Partial<GenerateRequest> =
    mode === 'raw' ? { adapterId: `raw-${index}`, adapterSource: 'local', adapterPath: `mem:raw-${index}` } : mode === 'compressed' ? { adapterId: syntheticBankId('u', index) } : {};
  return { prompt, maxNewTokens, ignoreEos: true, ...adapter };
}

/** The modes of a round, in the even rounds' order (odd rounds run them in reverse). */
const MODE_ORDER: readonly Mode[] = ['base', 'raw', 'compressed'];

/** Decode tokens/s with `batch` concurrent requests: tokens after every request's first, over that time. */
export async function decodeRate(engine: Engine, mode: Mode, batch: number, steps: number, offset: number): Promise<number> {
  const maxNew = steps + 1;
  let firstTokens = 0;
  let startedAt = 0;
  const runs = Array.from({ length: batch }, async (_, i) => {
    let seen = 0;
    for await (const event of engine.generate(requestFor(mode, offset + i, maxNew))) {
      if (event.type === 'token' && ++seen === 1 && ++firstTokens === batch) startedAt = performance.now();
    }
  });
  await Promise.all(runs);
  const seconds = (performance.now() - startedAt) / 1000;
  return (batch * steps) / seconds;
}

/**
 * Read bandwidth in bytes/s (best of three passes over 1 GiB, on the pool), or null without the native probe.
 * Measured again in every batch-1 round: this machine's bandwidth moves between modes (~45 and ~65-75 GB/s)
 * over minutes, so a step is held against the bandwidth measured beside it, not at the start of the run.
 */
function bandwidthProbe(): (() => number) | null {
  const { addon } = loadNativeAddon();
  const read = (addon as unknown as { memoryReadSum?: (variant: number, data: Float32Array) => number; bestVariant(): number } | null);
  const readSum = read?.memoryReadSum;
  if (!read || !readSum) return null;
  const data = new Float32Array((1 * 2 ** 30) / 4).fill(1);
  const variant = read.bestVariant();
  readSum(variant, data);
  return () => {
    let best = Infinity;
    for (let i = 0; i < 3; i++) {
      const start = performance.now();
      readSum(variant, data);
      best = Math.min(best, (performance.now() - start) / 1000);
    }
    return data.byteLength / best;
  };
}

/** Child process: make `count` adapters resident and print the RSS growth in bytes. */
async function rssChild(args: Args, mode: Mode): Promise<void> {
  const root = repositoryRoot(here);
  const model = await loadLlamaModel(await modelDir(root, 'bf16', args.layers));
  const rssArgs = { ...args, bankSize: args.rssAdapters, targets: args.rssTargets };
  const bank = benchBank(model.config, rssArgs);
  // factors as the engine's default loraDtype (auto) holds them
  const dtypes = adapterDtypes(modelWeightDtype(model));
  const cache = new AdapterCache({
    budgetBytes: Number.MAX_SAFE_INTEGER, bank, loadLocal: rawLoader(model.config, rssArgs), slotShape: slotShapeOf(model.config),
    factorDtype: dtypes.local, bankFactorDtype: dtypes.bank, maxConcurrentLoads: 1,
  });
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  const before = process.memoryUsage().rss;
  let peak = before;
  for (let i = 0; i < args.rssAdapters; i++) {
    const id = mode === 'raw' ? `raw-${i}` : syntheticBankId('u', i);
    if (mode === 'raw') cache.register(id, { source: 'local', dir: `mem:raw-${i}` });
    const entry = cache.acquire(id);
    while (entry.state !== 'resident') {
      if (entry.state === 'failed') throw entry.error;
      await new Promise((resolve) => setImmediate(resolve));
    }
    if (i % 50 === 0) peak = Math.max(peak, process.memoryUsage().rss);
  }
  gc?.();
  // settled: after a collection, what the resident adapters keep (the peak also holds the loads' transient buffers)
  const settled = process.memoryUsage().rss;
  peak = Math.max(peak, settled);
  process.stdout.write(JSON.stringify({ mode, adapters: args.rssAdapters, rssGrowth: settled - before, peakGrowth: peak - before, cacheBytes: cache.bytesResident }) + '\n');
}

export async function run(argv: string[]): Promise<void> {
  const args = parseArgs(argv);
  if (args.rssChild) return rssChild(args, args.rssChild);
  const root = repositoryRoot(here);
  const kernels = getKernels();
  const lines: string[] = [];
  const log = (line: string): void => {
    process.stderr.write(`${line}\n`);
  };
  const probe = bandwidthProbe();
  const measuredBandwidth = probe ? probe() : null;
  log(`kernel ${kernels.name}; read bandwidth ${measuredBandwidth ? (measuredBandwidth / 1e9).toFixed(1) + ' GB/s' : 'not measurable (no native memoryReadSum)'}`);
  const table: string[] = ['| dtype | batch | base tok/s | raw tok/s | raw / base | compressed tok/s | compressed / base |', '|---|---|---|---|---|---|---|'];
  const roofline: string[] = [];
  const sweep: string[] = [];
  const sweepBatch = Math.min(32, Math.max(...args.batches));
  for (const dtype of args.dtypes) {
    const dir = await modelDir(root, dtype, args.layers);
    const model: LlamaModel = await loadLlamaModel(dir);
    const engine = await createEngine({
      modelDir: dir,
      model,
      bank: benchBank(model.config, args),
      loadLocalAdapter: rawLoader(model.config, args),
      kernels,
      kvBudgetBytes: 512 << 20,
      adapterBudgetBytes: 4 * 2 ** 30,
      maxBatchTokens: 16 * Math.max(...args.batches),
      maxRunningRequests: Math.max(...args.batches),
      maxInputTokens: 64,
      maxTotalTokens: 256,
      blockSize: 16,
    });
    // warm-up: scratch buffers, JIT
    await decodeRate(engine, 'base', Math.max(...args.batches), 1, 0);
    for (const batch of args.batches) {
      const rates: Record<Mode, number[]> = { base: [], raw: [], compressed: [] };
      const ratios: Record<'raw' | 'compressed', number[]> = { raw: [], compressed: [] };
      // batch 1: each round's base step and the read bandwidth measured right after it
      const roundSteps: number[] = [];
      const roundBandwidths: number[] = [];
      // a first short run per mode (adapters loaded, this batch size's buffers grown), so the timed runs measure
      // decode only: without one for base, round 0's base read ~15 % slower than the later rounds' (f32, batch 1)
      for (const mode of MODE_ORDER) await decodeRate(engine, mode, batch, 1, 0);
      // modes interleaved over rounds (the machine is shared): the median rate of each mode, and each
      // round's mode / base ratio (measured back to back, so a load drifting between rounds cancels; the
      // order reverses every round, so a drift within a round cancels over two: in a fixed order the
      // compressed / base ratio at batch 32 read 0.84-0.93 across runs of the same code)
      for (let round = 0; round < args.rounds; round++) {
        const thisRound: Record<Mode, number> = { base: 0, raw: 0, compressed: 0 };
        for (const mode of round % 2 === 0 ? MODE_ORDER : [...MODE_ORDER].reverse()) {
          const rate = await decodeRate(engine, mode, batch, args.steps, 0);
          thisRound[mode] = rate;
          rates[mode].push(rate);
          log(`${dtype} batch ${batch} ${mode} round ${round}: ${rate.toFixed(2)} tok/s`);
        }
        ratios.raw.push(thisRound.raw / thisRound.base);
        ratios.compressed.push(thisRound.compressed / thisRound.base);
        if (batch === 1 && probe) {
          roundSteps.push(1 / thisRound.base);
          roundBandwidths.push(probe());
          log(`${dtype} batch 1 round ${round}: read bandwidth ${(roundBandwidths[roundBandwidths.length - 1]! / 1e9).toFixed(1)} GB/s`);
        }
      }
      table.push(`| ${dtype} | ${batch} | ${medianRange(rates.base)} | ${medianRange(rates.raw)} | ${medianRange(ratios.raw)} | ${medianRange(rates.compressed)} | ${medianRange(ratios.compressed)} |`);
      if (batch === 1) {
        const weightBytes = modelWeightBytes(model);
        const gbs = (bytesPerSecond: number): string => (bytesPerSecond / 1e9).toFixed(1);
        if (roundSteps.length > 0) {
          // per round: that round's step against the roofline at that round's bandwidth
          const perRound = roundSteps.map((step, i) => step / (weightBytes / roundBandwidths[i]!));
          roofline.push(`| ${dtype} | ${(weightBytes / 2 ** 20).toFixed(0)} MiB | ${fmt(median(roundSteps) * 1000)} ms | ` +
            `${gbs(Math.min(...roundBandwidths))}–${gbs(Math.max(...roundBandwidths))} GB/s | ${fmt(weightBytes / median(roundBandwidths) * 1000)} ms | ` +
            `${medianRange(perRound)} |`);
        } else {
          roofline.push(`| ${dtype} | ${(weightBytes / 2 ** 20).toFixed(0)} MiB | ${fmt(1000 / median(rates.base))} ms | – | – | – |`);
        }
      }
    }
    await engine.close();
    // compressed / base at batch 32 as the bank's shared rank grows: the shared bases a step reads grow with
    // rank × clusters (the adapters a real bank holds decide the rank; a bank of unrelated adapters needs a high one)
    // the f32 model's bank also held in f32 (loraDtype f32), beside the bf16 the engine's default holds it in
    const defaultBankDtype = adapterDtypes(modelWeightDtype(model)).bank;
    const bankDtypes = [...new Set([defaultBankDtype, modelWeightDtype(model)])];
    // per shared rank and byte, what the clusters' bases of one step hold: Σ over slots of (in + out)
    const shape = slotShapeOf(model.config);
    let features = 0;
    for (let layer = 0; layer < model.config.numLayers; layer++) for (const module of args.targets) {
      const slot = shape(layer, module);
      if (slot) features += slot.inFeatures + slot.outFeatures;
    }
    for (const bankDtype of bankDtypes) for (const sharedRank of args.rankSweep) {
      const swept = await createEngine({
        modelDir: dir, model, bank: benchBank(model.config, { ...args, sharedRank }), kernels, kvBudgetBytes: 512 << 20,
        adapterBudgetBytes: 4 * 2 ** 30, maxBatchTokens: 16 * sweepBatch, maxRunningRequests: sweepBatch, maxInputTokens: 64, maxTotalTokens: 256, blockSize: 16,
        loraDtype: bankDtype,
      });
      for (const mode of ['base', 'compressed'] as const) await decodeRate(swept, mode, sweepBatch, 1, 0);
      const ratios: number[] = [];
      for (let round = 0; round < args.rounds; round++) {
        const order = round % 2 === 0 ? (['base', 'compressed'] as const) : (['compressed', 'base'] as const);
        const rate: Record<string, number> = {};
        for (const mode of order) rate[mode] = await decodeRate(swept, mode, sweepBatch, args.steps, 0);
        ratios.push(rate.compressed! / rate.base!);
      }
      await swept.close();
      const basesBytes = Math.min(args.clusters, sweepBatch) * features * sharedRank * WEIGHT_DTYPE_BYTES[bankDtype];
      const held = bankDtype === defaultBankDtype ? `${bankDtype} (default)` : `${bankDtype} (--lora-dtype ${bankDtype})`;
      sweep.push(`| ${dtype} | ${held} | ${sharedRank} | ${fmt(basesBytes / 2 ** 20)} MiB | ${medianRange(ratios)} |`);
      log(`sweep ${dtype} bank ${bankDtype} shared rank ${sharedRank}: compressed / base ${median(ratios).toFixed(3)}`);
    }
  }
  // where a decode step's time goes, per mode (kernel calls timed one by one; robust to a shared machine)
  const breakdown: string[] = [];
  {
    const dtype = args.dtypes[args.dtypes.length - 1]!;
    const batch = args.batches.includes(32) ? 32 : Math.max(...args.batches);
    const dir = await modelDir(root, dtype, args.layers);
    const model = await loadLlamaModel(dir);
    const spent: Record<string, number> = { linears: 0, lmHead: 0, attention: 0 };
    const timed = { ...kernels } as Record<string, unknown>;
    const wrap = (name: keyof typeof kernels, bucket: string): void => {
      const op = kernels[name] as (...a: unknown[]) => unknown;
      timed[name] = (...a: unknown[]): unknown => {
        const start = performance.now();
        const result = op.apply(kernels, a);
        spent[bucket] = spent[bucket]! + performance.now() - start;
        return result;
      };
    };
    // the forward pass runs a block's linears that read one input as one matmulGroup call (their matmuls and
    // adapter work in one job), and lm_head as a plain matmul
    wrap('matmulGroup', 'linears');
    wrap('matmul', 'lmHead');
    wrap('attention', 'attention');
    const engine = await createEngine({
      modelDir: dir, model, bank: benchBank(model.config, args), loadLocalAdapter: rawLoader(model.config, args),
      kernels: timed as unknown as typeof kernels, kvBudgetBytes: 512 << 20, adapterBudgetBytes: 4 * 2 ** 30,
      maxBatchTokens: 16 * batch, maxRunningRequests: batch, maxInputTokens: 64, maxTotalTokens: 256, blockSize: 16,
    });
    // (long run − short run) isolates decode steps from prefill. One pair per mode read compressed's step shorter
    // than base's in two runs (26.5 against 30.6 ms): a slow short run's prefill comes off the long run's steps. So
    // pairs over the rounds, modes interleaved (in reverse every other round), each cell the median of its rounds.
    const measure = async (mode: Mode, steps: number): Promise<{ wall: number; spent: Record<string, number> }> => {
      for (const key of Object.keys(spent)) spent[key] = 0;
      const start = performance.now();
      await decodeRate(engine, mode, batch, steps, 0);
      return { wall: performance.now() - start, spent: { ...spent } };
    };
    const perStep: Record<Mode, Record<'step' | 'linears' | 'lmHead' | 'attention' | 'other', number[]>> = {
      base: { step: [], linears: [], lmHead: [], attention: [], other: [] },
      raw: { step: [], linears: [], lmHead: [], attention: [], other: [] },
      compressed: { step: [], linears: [], lmHead: [], attention: [], other: [] },
    };
    for (const mode of MODE_ORDER) await decodeRate(engine, mode, batch, 1, 0);
    for (let round = 0; round < args.rounds; round++) {
      for (const mode of round % 2 === 0 ? MODE_ORDER : [...MODE_ORDER].reverse()) {
        const short = await measure(mode, 1);
        const long = await measure(mode, 1 + args.steps);
        const per = (key: string): number => (long.spent[key]! - short.spent[key]!) / args.steps;
        const cells = perStep[mode];
        const wall = (long.wall - short.wall) / args.steps;
        cells.step.push(wall);
        cells.linears.push(per('linears'));
        cells.lmHead.push(per('lmHead'));
        cells.attention.push(per('attention'));
        cells.other.push(wall - per('linears') - per('lmHead') - per('attention'));
      }
    }
    for (const mode of MODE_ORDER) {
      const cells = perStep[mode];
      breakdown.push(`| ${mode} | ${fmt(median(cells.step))} ms | ${fmt(median(cells.linears))} ms | ${fmt(median(cells.lmHead))} ms | ${fmt(median(cells.attention))} ms | ${fmt(median(cells.other))} ms |`);
      log(`breakdown ${dtype} batch ${batch} ${mode}: ${breakdown[breakdown.length - 1]}`);
    }
    await engine.close();
    breakdown.unshift(`Decode-step breakdown, ${dtype}, batch ${batch} (per step, each cell the median of ${args.rounds} interleaved rounds of a 1-step and a ` +
      `${1 + args.steps}-step run, their difference over ${args.steps} steps; "linears" is the 7 linears of every layer, run as matmulGroup ` +
      'calls (q, k, v; o; gate, up; down) with their rows\' adapters; "other" is the engine, sampling and the remaining element-wise ops):',
    '', '| mode | step | linears | lm_head | attention | other |', '|---|---|---|---|---|---|');
  }

  // resident-set growth, each mode in a fresh child process
  const rss: string[] = [];
  for (const mode of ['compressed', 'raw'] as const) {
    try {
      const out = execFileSync(process.execPath, ['--expose-gc', process.argv[1]!, 'engine', ...argv, '--rss-child', mode], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 20 });
      const result = JSON.parse(out.trim().split('\n').pop()!) as { rssGrowth: number; peakGrowth: number; cacheBytes: number };
      rss.push(`| ${mode} | ${args.rssAdapters} | ${(result.cacheBytes / 2 ** 20).toFixed(1)} MiB | ${(result.rssGrowth / 2 ** 20).toFixed(1)} MiB | ${(result.peakGrowth / 2 ** 20).toFixed(1)} MiB |`);
      log(`rss ${mode}: ${(result.rssGrowth / 2 ** 20).toFixed(1)} MiB`);
    } catch (e) {
      rss.push(`| ${mode} | ${args.rssAdapters} | – | failed: ${(e as Error).message.split('\n')[0]} | – |`);
    }
  }
  // node-llama-cpp on the same weights (exported to GGUF) and the same raw adapters (as GGUF LoRA, one context each)
  const llamaCppLines = await llamaCppPeerSection({ root, models: Object.fromEntries(await Promise.all(args.dtypes.map(async (d) => [d, await modelDir(root, d, args.layers)]))), batchSizes: [1, 8], adapters: { base: { ...BASE_SHAPES['smollm-135m'], numHiddenLayers: args.layers ?? BASE_SHAPES['smollm-135m'].numHiddenLayers }, rank: args.rank, targets: args.targets, seed: 3, count: 32 }, log });
  const command = `npm run bench -- engine ${argv.join(' ')}`.trim();
  lines.push(
    '## Engine: decode throughput with many adapters',
    '',
    `Command: \`${command}\` — ${new Date().toISOString().slice(0, 10)}, ${machineDescription()}, kernel ${kernels.name}.`,
    `Model: SmolLM-135M shapes (generated weights${args.layers ? `, ${args.layers} layers` : ''}). Raw adapters: rank ${args.rank} on ${args.targets.join(', ')}, one distinct adapter per row. ` +
      `Compressed: a synthetic in-memory bank of ${args.bankSize} adapters, ${args.clusters} clusters, shared rank ${args.sharedRank}, full cores, one distinct adapter per row. ` +
      `Adapters are held as the engine's default (loraDtype auto) holds them: raw PEFT adapters' A and Bᵀ in the model's dtype; the bank's shared bases and cores in the model's dtype when it is 16-bit, else bf16, so the f32 rows' compressed adapters are bf16 (a bank is a fit within an error budget, 10 % by default; one bf16 rounding adds ~0.3 %; the sweep below has the f32 model's bank held in f32 too). ` +
      `Decode tok/s = batch × ${args.steps} steps / time after every request's first token (prompts of 16 tokens), the median (range) of ${args.rounds} interleaved rounds; ` +
      `a ratio is the median over the rounds of that round's mode / base (the three modes run back to back in each round, in reverse order every other round). Targets at batch 32: compressed ≥ 0.9× base, raw ≥ 0.7× base.`,
    '',
    ...table,
    '',
    ...(sweep.length > 0
      ? [`Compressed / base at batch ${sweepBatch} by the bank's shared rank and the dtype it is held in (${args.clusters} clusters, full cores; the same rounds; "bases per step" is what one decode step reads of the clusters' shared U and Vᵀ):`,
        '', '| model dtype | bank held in | shared rank | bases per step | compressed / base, median (range) |', '|---|---|---|---|---|', ...sweep, '']
      : []),
    'Batch-1 decode step vs the roofline (weight bytes / read bandwidth; target within 1.3×). The bandwidth is measured after every round ' +
      '(best of three passes over 1 GiB): this machine moves between bandwidth modes over minutes, so each round\'s step is held against ' +
      'the bandwidth beside it:',
    '',
    '| dtype | weights | measured step (median) | read bandwidth (per round) | roofline (median bandwidth) | step / roofline, median of rounds (range) |',
    '|---|---|---|---|---|---|',
    ...roofline,
    '',
    ...breakdown,
    '',
    `Resident-set growth with every adapter resident (each mode in a fresh process, bf16 model, so bf16 factors and cores; adapters on ${args.rssTargets.join(', ')}, raw rank ${args.rank}, compressed shared rank ${args.sharedRank}):`,
    '',
    '| storage | adapters | cache bytes | RSS growth after GC | peak RSS growth while loading |',
    '|---|---|---|---|---|',
    ...rss,
    '',
    ...llamaCppLines,
  );
  const markdown = lines.join('\n');
  process.stdout.write(`${markdown}\n`);
  if (args.write) log(`wrote ${writeBenchmarkSection(root, 'engine', markdown)}`);
}
