/**
 * Non-matmul kernels benchmark: every native variant of rmsnorm, softmax, siluMul, paged attention
 * and the LoRA segment ops, against the TypeScript reference and NumPy (peer, same thread count)
 * measured in the same run, on real-model shapes.
 *
 *   SOPPU_THREADS=2 npm run bench -- ops [--no-write]
 */
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { refKernels, supportedNativeKernelSets } from '../src/kernels/index.js';
import type { AttentionArgs, KernelSet, LoraCore, LoraSegment } from '../src/kernels/kernel-set.js';
import { loadNativeAddon } from '../src/kernels/native-addon.js';
import { Random } from '../src/tensor/random.js';
import { f32ArrayToBf16 } from '../src/tensor/dtype.js';
import { weightMatrix, type WeightMatrix } from '../src/tensor/weight-matrix.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { fmt, secondsPerCall } from './helpers/timing.js';

type Case =
  | { op: 'rmsnorm'; rows: number; dim: number }
  | { op: 'softmax' | 'argmax'; rows: number; cols: number }
  | { op: 'siluMul'; n: number }
  | { op: 'attention'; seqs: number; qLen: number; ctxLen: number; heads: number; kvHeads: number; headDim: number; blockSize: number }
  | { op: 'loraShrink' | 'loraExpand'; rows: number; k: number; n: number; rank: number; segments: number }
  | { op: 'loraCore'; rows: number; rank: number }
  | { op: 'loraApply'; rows: number; k: number; n: number; rank: number; segments: number; cores: boolean; dtype?: 'bf16' };

const CASES: Case[] = [
  { op: 'rmsnorm', rows: 1, dim: 4096 },
  { op: 'rmsnorm', rows: 32, dim: 4096 },
  { op: 'softmax', rows: 32, cols: 4096 },
  // greedy sampling's choice over a SmolLM vocabulary, one row per sequence of a batch-32 step
  { op: 'argmax', rows: 32, cols: 49152 },
  { op: 'siluMul', n: 32 * 14336 },
  { op: 'attention', seqs: 8, qLen: 1, ctxLen: 512, heads: 32, kvHeads: 8, headDim: 128, blockSize: 16 },
  { op: 'attention', seqs: 16, qLen: 1, ctxLen: 256, heads: 14, kvHeads: 2, headDim: 64, blockSize: 16 },
  { op: 'attention', seqs: 1, qLen: 256, ctxLen: 256, heads: 14, kvHeads: 2, headDim: 64, blockSize: 16 },
  { op: 'loraShrink', rows: 8, k: 4096, n: 4096, rank: 16, segments: 8 },
  { op: 'loraExpand', rows: 8, k: 4096, n: 4096, rank: 16, segments: 8 },
  { op: 'loraShrink', rows: 256, k: 896, n: 896, rank: 64, segments: 1 },
  { op: 'loraExpand', rows: 256, k: 896, n: 896, rank: 64, segments: 1 },
  { op: 'loraCore', rows: 32, rank: 64 },
  // one decode slot of the engine bench at batch 32 (SmolLM 576 → 1536): raw, and compressed (4 clusters)
  { op: 'loraApply', rows: 32, k: 576, n: 1536, rank: 8, segments: 32, cores: false },
  { op: 'loraApply', rows: 32, k: 576, n: 1536, rank: 16, segments: 4, cores: true },
  // the same with bf16 factors (the engine's default for a bf16 model); the NumPy peer stays f32
  { op: 'loraApply', rows: 32, k: 576, n: 1536, rank: 8, segments: 32, cores: false, dtype: 'bf16' },
  { op: 'loraApply', rows: 32, k: 576, n: 1536, rank: 16, segments: 4, cores: true, dtype: 'bf16' },
];

function describeCase(c: Case): string {
  switch (c.op) {
    case 'rmsnorm': return `rmsnorm [${c.rows}, ${c.dim}]`;
    case 'softmax': return `softmax [${c.rows}, ${c.cols}]`;
    case 'argmax': return `argmax [${c.rows}, ${c.cols}]`;
    case 'siluMul': return `siluMul n=${c.n}`;
    case 'attention': return `attention ${c.seqs}×(q ${c.qLen}, ctx ${c.ctxLen}) H ${c.heads}/${c.kvHeads} D ${c.headDim}`;
    case 'loraCore': return `loraCore full R ${c.rank}, ${c.rows} rows`;
    case 'loraApply': return `loraApply ${c.segments} seg × ${c.rows / c.segments} rows, K ${c.k} N ${c.n}, R ${c.rank}${c.cores ? ', full core per row' : ''}${c.dtype ? `, ${c.dtype} factors${c.cores ? ' and cores' : ''}` : ''}`;
    default: return `${c.op} ${c.segments} seg × ${c.rows / c.segments} rows, ${c.op === 'loraShrink' ? `K ${c.k}` : `N ${c.n}`}, R ${c.rank}`;
  }
}

/** c.segments equal runs of rows, each with its own factors A [R, K] and Bᵀ [R, N] (f32 unless c.dtype). */
function equalSegments(c: { rows: number; segments: number; rank: number; k: number; n: number; dtype?: 'bf16' },
  normal: (n: number, std?: number) => Float32Array): LoraSegment[] {
  const per = c.rows / c.segments;
  const factor = (rows: number, cols: number): WeightMatrix => {
    const data = normal(rows * cols, 0.02);
    return c.dtype === 'bf16' ? weightMatrix('bf16', rows, cols, f32ArrayToBf16(data)) : weightMatrix('f32', rows, cols, data);
  };
  return Array.from({ length: c.segments }, (_, s) => ({ start: s * per, end: (s + 1) * per, a: factor(c.rank, c.k), bt: factor(c.rank, c.n) }));
}

/** A closure running the op once with `kernels` on data built from `rng`. */
function prepare(c: Case, rng: Random): (kernels: KernelSet) => void {
  const normal = (n: number, std = 1): Float32Array => rng.fillNormal(new Float32Array(n), std);
  switch (c.op) {
    case 'rmsnorm': {
      const x = normal(c.rows * c.dim);
      const w = normal(c.dim);
      const out = new Float32Array(x.length);
      return (k) => k.rmsnorm(out, x, w, c.rows, c.dim, 1e-6);
    }
    case 'softmax': {
      const x = normal(c.rows * c.cols);
      return (k) => k.softmax(x, c.rows, c.cols);
    }
    case 'argmax': {
      const x = normal(c.rows * c.cols);
      const out = new Int32Array(c.rows);
      return (k) => k.argmax(out, x, c.rows, c.cols);
    }
    case 'siluMul': {
      const gate = normal(c.n);
      const up = normal(c.n);
      const out = new Float32Array(c.n);
      return (k) => k.siluMul(out, gate, up, c.n);
    }
    case 'attention': {
      const blocksPerSeq = Math.ceil(c.ctxLen / c.blockSize);
      const numBlocks = c.seqs * blocksPerSeq;
      const order = Array.from({ length: numBlocks }, (_, i) => i).sort(() => rng.next() - 0.5);
      const rows = c.seqs * c.qLen;
      const args: AttentionArgs = {
        out: new Float32Array(rows * c.heads * c.headDim),
        q: normal(rows * c.heads * c.headDim),
        kCache: normal(numBlocks * c.blockSize * c.kvHeads * c.headDim),
        vCache: normal(numBlocks * c.blockSize * c.kvHeads * c.headDim),
        blockTable: Int32Array.from(order),
        blockTableStart: Int32Array.from({ length: c.seqs }, (_, s) => s * blocksPerSeq),
        qStart: Int32Array.from({ length: c.seqs }, (_, s) => s * c.qLen),
        qLen: new Int32Array(c.seqs).fill(c.qLen),
        ctxLen: new Int32Array(c.seqs).fill(c.ctxLen),
        seqs: c.seqs, heads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim, blockSize: c.blockSize,
        scale: 1 / Math.sqrt(c.headDim),
      };
      return (k) => k.attention(args);
    }
    case 'loraShrink':
    case 'loraExpand': {
      const segments = equalSegments(c, normal);
      const x = normal(c.rows * c.k);
      const t = normal(c.rows * c.rank);
      const y = normal(c.rows * c.n);
      return c.op === 'loraShrink'
        ? (k) => k.loraShrink(t, c.rank, x, c.k, segments)
        : (k) => k.loraExpand(y, c.n, t, c.rank, segments);
    }
    case 'loraApply': {
      const segments = equalSegments(c, normal);
      // cores in the factors' dtype, as the engine holds them (loraDtype)
      const core = (): LoraCore => {
        const data = normal(c.rank * c.rank);
        return c.dtype === 'bf16' ? { rank: c.rank, diagonal: false, dtype: 'bf16', data: f32ArrayToBf16(data) } : { rank: c.rank, diagonal: false, data };
      };
      const cores: LoraCore[] = c.cores ? Array.from({ length: c.rows }, core) : [];
      const x = normal(c.rows * c.k);
      const y = normal(c.rows * c.n);
      return (k) => k.loraApply(y, c.n, x, c.k, segments, cores);
    }
    case 'loraCore': {
      const cores: LoraCore[] = Array.from({ length: c.rows }, () => ({ rank: c.rank, diagonal: false, data: normal(c.rank * c.rank) }));
      const t = normal(c.rows * c.rank);
      const out = new Float32Array(t.length);
      return (k) => k.loraCore(out, t, c.rank, c.rows, cores);
    }
  }
}

function numpySeconds(threads: number): { seconds: number[] | null; note: string } {
  const script = join(repositoryRoot(dirname(fileURLToPath(import.meta.url))), 'bench', 'peers', 'ops_numpy.py');
  const env = { ...process.env, OPENBLAS_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads), MKL_NUM_THREADS: String(threads) };
  try {
    const version = execFileSync('python3', ['-c', 'import numpy; print(numpy.__version__)'], { env, encoding: 'utf8' }).trim();
    const output = execFileSync('python3', [script, JSON.stringify(CASES)], { env, encoding: 'utf8', maxBuffer: 1 << 20 });
    return { seconds: JSON.parse(output) as number[], note: `NumPy ${version}, BLAS threads ${threads}` };
  } catch (error) {
    return { seconds: null, note: `NumPy skipped: ${error instanceof Error ? error.message.split('\n')[0] : String(error)}` };
  }
}

export async function run(args: string[]): Promise<void> {
  const { addon } = loadNativeAddon();
  const threads = addon ? addon.numThreads() : 1;
  const sets = supportedNativeKernelSets();
  const numpy = numpySeconds(threads);
  const header = `| op | ${sets.map((s) => `${s.name} ms`).join(' | ')} | ref ms | NumPy ms | ref / best native | NumPy / best native |`;
  const lines = [header, `|---|${sets.map(() => '---:|').join('')}---:|---:|---:|---:|`];
  CASES.forEach((c, index) => {
    const run = prepare(c, new Random(100 + index));
    const nativeSeconds = sets.map((set) => secondsPerCall(() => run(set), { minSeconds: 0.2 }));
    const refSeconds = secondsPerCall(() => run(refKernels), { warmup: 1, rounds: 3, minSeconds: 0.1, minCalls: 1 });
    const best = Math.min(...nativeSeconds);
    const peer = numpy.seconds?.[index] ?? null;
    const line = `| ${describeCase(c)} | ${nativeSeconds.map((s) => fmt(s * 1e3)).join(' | ')} | ${fmt(refSeconds * 1e3)} | ${fmt(peer === null ? null : peer * 1e3)} | ${fmt(refSeconds / best)}× | ${fmt(peer === null ? null : peer / best)}× |`;
    lines.push(line);
    process.stdout.write(`${line}\n`);
  });
  const markdown = [
    '## Kernels: element-wise, attention, LoRA segment ops',
    '',
    `Command: \`SOPPU_THREADS=${threads} npm run bench -- ops\` — ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`,
    '',
    `Machine: ${machineDescription()}. ${threads} native threads; ${numpy.note}. Times are the median of 5 rounds (ref: 3).`,
    'Attention uses a shuffled (non-contiguous) block table; LoRA ops use f32 factors unless a row says bf16; the NumPy peer gathers each',
    "sequence's blocks then runs batched matmuls (attention) or one matmul per segment (LoRA).",
    '',
    ...lines,
  ].join('\n');
  if (!args.includes('--no-write')) {
    const file = writeBenchmarkSection(repositoryRoot(dirname(fileURLToPath(import.meta.url))), 'ops', markdown);
    process.stdout.write(`wrote ${file}\n`);
  }
}
