/**
 * Huge pages: one decode step's 210 targeted linears of a SmolLM-135M-shaped model (as lora-step builds them), with
 * the weights and the compressed adapters' shared bases on ordinary 4 KiB pages (each array its own allocation)
 * against the same bytes in huge-page buffers (largePageBuffer: the model's matrices in one, each cluster's bases in
 * one, as loadLlamaModel and the adapter cache place them). Per dtype, four modes interleaved per iteration in
 * alternating order: base (matmul) and fused compressed LoRA (matmulLora; 4 clusters, shared rank 16), each on both
 * kinds of pages, at batch 1 (base only: no adapter work is batched there) and at --batch.
 *
 *   npm run bench -- pages [--batch 32] [--iterations 40] [--dtypes bf16,f32] [--no-write]
 */
import { readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { HUGE_PAGE_BYTES, largePageBuffer } from '../src/kernels/large-page-buffer.js';
import type { KernelSet, LoraSegment } from '../src/kernels/kernel-set.js';
import { alignedBytes, alignedViews } from '../src/tensor/aligned-views.js';
import { Random } from '../src/tensor/random.js';
import { weightMatrix, type WeightMatrix } from '../src/tensor/weight-matrix.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { fmt, median } from './helpers/timing.js';
import { buildSlots, runStep, stepBenchSetup, type Slot } from './lora-step.js';

/** Copies matrices (in the order given) into one huge-page buffer, each at a 64-byte boundary. */
function packer(matrices: readonly WeightMatrix[]): (matrix: WeightMatrix) => WeightMatrix {
  const views = alignedViews(largePageBuffer(Math.max(HUGE_PAGE_BYTES, matrices.reduce((sum, m) => sum + alignedBytes(m.data.byteLength), 0))));
  return (matrix) => {
    const view = views(matrix.dtype, matrix.data.length);
    view.set(matrix.data);
    return weightMatrix(matrix.dtype, matrix.rows, matrix.cols, view);
  };
}

/** The same slots with the weights in one huge-page buffer and each cluster's bases (by segment index) in one. */
function onHugePages(slots: readonly Slot[]): Slot[] {
  const weights = packer(slots.map((slot) => slot.w));
  const clusters = slots[0]!.segments.length;
  const bases = Array.from({ length: clusters }, (_, c) => packer(slots.flatMap((slot) => [slot.segments[c]!.a!, slot.segments[c]!.bt!])));
  return slots.map((slot) => ({
    w: weights(slot.w),
    segments: slot.segments.map((segment, c): LoraSegment => ({ ...segment, a: bases[c]!(segment.a!), bt: bases[c]!(segment.bt!) })),
    cores: slot.cores,
  }));
}

/** Bytes of this process on transparent huge pages. */
function anonHugeBytes(): number {
  try {
    const line = readFileSync('/proc/self/smaps_rollup', 'utf8').split('\n').find((l) => l.startsWith('AnonHugePages:'));
    return Number(/(\d+)/.exec(line ?? '')?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

type Mode = 'base 4K' | 'base huge' | 'LoRA 4K' | 'LoRA huge';

function timeModes(kernels: KernelSet, modes: readonly Mode[], plain: readonly Slot[], huge: readonly Slot[], batch: number, iterations: number): Record<Mode, number[]> {
  const rng = new Random(11);
  const x = rng.fillNormal(new Float32Array(batch * 1536), 1);
  const y = new Float32Array(batch * 1536);
  const times = Object.fromEntries(modes.map((m) => [m, [] as number[]])) as Record<Mode, number[]>;
  const warmup = 2;
  for (let iteration = 0; iteration < warmup + iterations; iteration++) {
    for (const mode of iteration % 2 === 0 ? modes : [...modes].reverse()) {
      const slots = mode.endsWith('huge') ? huge : plain;
      const start = process.hrtime.bigint();
      runStep(kernels, mode.startsWith('base') ? 'base' : 'fused', slots, x, y, batch);
      if (iteration >= warmup) times[mode].push(Number(process.hrtime.bigint() - start) / 1e6);
    }
  }
  return times;
}

export async function run(args: string[]): Promise<void> {
  const { batch, iterations, dtypes, kernels, threads } = stepBenchSetup(args, 40);
  const rng = new Random(7);
  const lines = [
    '| dtype | batch | base, 4 KiB pages | base, huge pages | huge / 4 KiB | LoRA over base, 4 KiB | LoRA over base, huge | huge / 4 KiB |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ];
  let hugeBytes = 0;
  for (const dtype of dtypes) {
    const plain = buildSlots('compressed', dtype, batch, rng);
    const huge = onHugePages(plain);
    hugeBytes = Math.max(hugeBytes, anonHugeBytes());
    for (const rows of [1, batch]) {
      const modes: Mode[] = rows === 1 ? ['base 4K', 'base huge'] : ['base 4K', 'base huge', 'LoRA 4K', 'LoRA huge'];
      const times = timeModes(kernels, modes, plain, huge, rows, iterations);
      const base4k = median(times['base 4K']);
      const baseHuge = median(times['base huge']);
      const lora = (pages: '4K' | 'huge'): number => median(times[`LoRA ${pages}`].map((t, i) => t - times[`base ${pages}`][i]!));
      const [lora4k, loraHuge] = rows === 1 ? [null, null] : [lora('4K'), lora('huge')];
      const line = `| ${dtype} | ${rows} | ${fmt(base4k)} ms | ${fmt(baseHuge)} ms | ${fmt(baseHuge / base4k)}× | ${lora4k === null ? '—' : `${fmt(lora4k)} ms`} | ${loraHuge === null ? '—' : `${fmt(loraHuge)} ms`} | ${lora4k === null || loraHuge === null ? '—' : `${fmt(loraHuge / lora4k)}×`} |`;
      lines.push(line);
      process.stdout.write(`${line}\n`);
    }
  }
  let thp = 'unknown';
  try {
    thp = /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1] ?? thp;
  } catch {
    // no THP control file: leave it unknown
  }
  const markdown = [
    '## Huge pages: weights and shared bases on 2 MiB pages',
    '',
    `Command: \`npm run bench -- pages --batch ${batch} --iterations ${iterations} --dtypes ${dtypes.join(',')}\` — ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`,
    '',
    `Machine: ${machineDescription()}. Kernels ${kernels.name}, ${threads} threads. transparent_hugepage: ${thp}; ${fmt(hugeBytes / 2 ** 20)} MiB of this process on huge pages.`,
    'The 210 targeted linears of a SmolLM-135M-shaped decode step (as lora-step builds them: every slot its own weights; compressed adapters,',
    `4 clusters of ${batch / 4} rows, shared rank 16, a full core per row, in the weights' dtype). 4 KiB: each matrix its own array. Huge: the same bytes`,
    'in largePageBuffer buffers, the weights in one and each cluster\'s bases in one, as loadLlamaModel and the adapter cache place them.',
    'Modes interleaved per iteration, in alternating order; times are medians; LoRA over base = median of (fused compressed − base) on the same',
    'pages in that iteration.',
    '',
    ...lines,
  ].join('\n');
  if (!args.includes('--no-write')) {
    const file = writeBenchmarkSection(repositoryRoot(dirname(fileURLToPath(import.meta.url))), 'pages', markdown);
    process.stdout.write(`wrote ${file}\n`);
  }
}
