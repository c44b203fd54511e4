/**
 * One decode step's linear layers with many adapters, kernels alone: the 210 targeted linears of a
 * SmolLM-135M-shaped step (30 layers × q, k, v, o, gate, up, down) at batch M, run as
 *   base         matmul only
 *   separate     matmul, then loraApply (the engine's path before matmulLora)
 *   fused        matmulLora (the engine runs it as a part of matmulGroup, beside the linears that share its input)
 * for compressed slots (4 clusters of M/4 rows, shared rank 16, a full core per row) and raw slots
 * (rank 8, one adapter per row), bf16 and f32 weights with factors and cores of the same dtype. Every slot has
 * its own weights and factors, so each step streams them from memory as a served step does.
 * Modes run interleaved per iteration (the machine is shared; base first, the other two in alternating
 * order, so neither always follows the other); a mode's LoRA cost is the median over
 * iterations of (that iteration's mode time − its base time). base / (base + cost) is what the
 * engine's mode/base decode ratio would be if a step were its linears alone; the engine's step also
 * spends time on attention, norms and sampling that adapters do not change (which lifts its ratio), and
 * on the step's adapter bookkeeping and the caches the factors evict (which lower it): read the engine
 * bench for the served ratio.
 *
 *   npm run bench -- lora-step [--batch 32] [--iterations 30] [--dtypes bf16,f32] [--no-write]
 */
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getKernels } from '../src/kernels/index.js';
import type { KernelSet, LoraCore, LoraSegment } from '../src/kernels/kernel-set.js';
import { f32ArrayToBf16 } from '../src/tensor/dtype.js';
import { Random } from '../src/tensor/random.js';
import { weightMatrix, type WeightMatrix } from '../src/tensor/weight-matrix.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { fmt, median } from './helpers/timing.js';
import { loadNativeAddon } from '../src/kernels/native-addon.js';

/** [in, out] of q, k, v, o, gate, up, down in SmolLM-135M. */
const SLOT_SHAPES: readonly [number, number][] = [[576, 576], [576, 192], [576, 192], [576, 576], [576, 1536], [576, 1536], [1536, 576]];
const LAYERS = 30;

export interface Slot {
  readonly w: WeightMatrix;
  readonly segments: readonly LoraSegment[];
  readonly cores: readonly (LoraCore | undefined)[];
}

export type Dtype = 'f32' | 'bf16';

function option(args: string[], name: string): string | undefined {
  const index = args.indexOf(`--${name}`);
  return index >= 0 ? args[index + 1] : undefined;
}

/** Every slot of a step with its own weights, and adapters of one kind over `batch` rows. */
export function buildSlots(kind: 'compressed' | 'raw', dtype: Dtype, batch: number, rng: Random): Slot[] {
  const matrix = (rows: number, cols: number, std: number): WeightMatrix => {
    const values = rng.fillNormal(new Float32Array(rows * cols), std);
    return dtype === 'f32' ? weightMatrix('f32', rows, cols, values) : weightMatrix('bf16', rows, cols, f32ArrayToBf16(values));
  };
  const slots: Slot[] = [];
  for (let layer = 0; layer < LAYERS; layer++) {
    for (const [k, n] of SLOT_SHAPES) {
      const w = matrix(n, k, 1 / Math.sqrt(k));
      if (kind === 'compressed') {
        const clusters = 4;
        const per = batch / clusters;
        const segments = Array.from({ length: clusters }, (_, c) => ({ start: c * per, end: (c + 1) * per, a: matrix(16, k, 0.05), bt: matrix(16, n, 0.05) }));
        // cores in the weights' dtype too, as the engine holds them
        const cores: LoraCore[] = Array.from({ length: batch }, () => {
          const values = rng.fillNormal(new Float32Array(256), 0.2);
          return dtype === 'f32' ? { rank: 16, diagonal: false, data: values } : { rank: 16, diagonal: false, dtype, data: f32ArrayToBf16(values) };
        });
        slots.push({ w, segments, cores });
      } else {
        const segments = Array.from({ length: batch }, (_, r) => ({ start: r, end: r + 1, a: matrix(8, k, 0.05), bt: matrix(8, n, 0.05) }));
        slots.push({ w, segments, cores: [] });
      }
    }
  }
  return slots;
}

type Mode = 'base' | 'separate' | 'fused';

export function runStep(kernels: KernelSet, mode: Mode, slots: readonly Slot[], x: Float32Array, y: Float32Array, batch: number): void {
  for (const { w, segments, cores } of slots) {
    // y: [batch, n]; x: [batch, k] (one buffer wide enough for every slot)
    if (mode === 'fused') {
      kernels.matmulLora(y, x, w, batch, segments, cores);
      continue;
    }
    kernels.matmul(y, x, w, batch);
    if (mode === 'separate') kernels.loraApply(y, w.rows, x, w.cols, segments, cores);
  }
}

/** A step bench's arguments (--batch, --iterations, --dtypes), its kernels and their thread count. */
export function stepBenchSetup(args: string[], defaultIterations: number): { batch: number; iterations: number; dtypes: Dtype[]; kernels: KernelSet; threads: number } {
  const batch = Number(option(args, 'batch') ?? 32);
  const iterations = Number(option(args, 'iterations') ?? defaultIterations);
  const dtypes = (option(args, 'dtypes') ?? 'bf16,f32').split(',') as Dtype[];
  if (!Number.isInteger(batch) || batch < 4 || batch % 4 !== 0) throw new Error(`--batch must be a multiple of 4 (got ${batch})`);
  const { addon } = loadNativeAddon();
  return { batch, iterations, dtypes, kernels: getKernels(), threads: addon ? addon.numThreads() : 1 };
}

export async function run(args: string[]): Promise<void> {
  const { batch, iterations, dtypes, kernels, threads } = stepBenchSetup(args, 30);
  const rng = new Random(7);
  const x = rng.fillNormal(new Float32Array(batch * 1536), 1);
  const y = new Float32Array(batch * 1536);
  const lines = [
    '| dtype | adapters | base step ms | separate: LoRA ms | fused: LoRA ms | fused / separate | base / (base + fused LoRA) |',
    '|---|---|---:|---:|---:|---:|---:|',
  ];
  for (const dtype of dtypes) {
    for (const kind of ['compressed', 'raw'] as const) {
      const slots = buildSlots(kind, dtype, batch, rng);
      const times: Record<Mode, number[]> = { base: [], separate: [], fused: [] };
      const warmup = 2;
      for (let iteration = 0; iteration < warmup + iterations; iteration++) {
        // base first (each iteration's reference), then the two adapter modes in alternating order
        const order: readonly Mode[] = iteration % 2 === 0 ? ['base', 'separate', 'fused'] : ['base', 'fused', 'separate'];
        for (const mode of order) {
          const start = process.hrtime.bigint();
          runStep(kernels, mode, slots, x, y, batch);
          if (iteration >= warmup) times[mode].push(Number(process.hrtime.bigint() - start) / 1e6);
        }
      }
      const base = median(times.base);
      const cost = (mode: Mode): number => median(times[mode].map((t, i) => t - times.base[i]!));
      const separate = cost('separate');
      const fused = cost('fused');
      const line = `| ${dtype} | ${kind} | ${fmt(base)} | ${fmt(separate)} | ${fmt(fused)} | ${fmt(fused / separate)}× | ${fmt(base / (base + fused))}× |`;
      lines.push(line);
      process.stdout.write(`${line}\n`);
    }
  }
  const markdown = [
    '## LoRA step: one decode step\'s linears with adapters, kernels alone',
    '',
    `Command: \`npm run bench -- lora-step --batch ${batch} --iterations ${iterations} --dtypes ${dtypes.join(',')}\` — ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`,
    '',
    `Machine: ${machineDescription()}. Kernels ${kernels.name}, ${threads} threads.`,
    `The 210 targeted linears of a SmolLM-135M-shaped decode step at batch ${batch}, every slot with its own weights and factors (so each step`,
    'reads them from memory, as a served step does). Compressed: 4 clusters, shared rank 16, a full 16×16 core per row; raw: rank 8, one',
    'adapter per row; factors and cores in the weights\' dtype. base = matmul alone; separate = matmul then loraApply; fused = matmulLora (the',
    'engine\'s path). Modes interleaved per iteration (base first, the other two in alternating order); LoRA ms = median over iterations of (mode − base) in that iteration. The last column',
    'is the mode/base ratio a step made of its linears alone would have; the engine\'s step also spends time on attention, norms and',
    'sampling that adapters do not change (which lifts its ratio), and on the step\'s adapter bookkeeping and the caches the factors',
    'evict (which lower it): the engine table gives the served ratio.',
    '',
    ...lines,
  ].join('\n');
  if (!args.includes('--no-write')) {
    const file = writeBenchmarkSection(repositoryRoot(dirname(fileURLToPath(import.meta.url))), 'lora-step', markdown);
    process.stdout.write(`wrote ${file}\n`);
  }
}
