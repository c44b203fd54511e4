/**
 * Kernels benchmark: native matmul (f32/bf16/f16 weights) against the memory-bandwidth roofline and
 * against peers measured in the same run (NumPy/OpenBLAS, onnxruntime-node MatMul), same threads.
 *
 *   SOPPU_THREADS=2 npm run bench -- kernels [--no-write] [--quick]
 *
 * Weight sets are cycled so that the bytes touched per sweep exceed the last-level cache (LLC_MB,
 * default 320): a decode matmul then streams from DRAM as it does in a real model.
 */
import { execFileSync } from 'node:child_process';
import { cpus, loadavg } from 'node:os';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { getKernels } from '../src/kernels/index.js';
import { loadNativeAddon } from '../src/kernels/native-addon.js';
import { f32ArrayToBf16, f32ArrayToF16, type WeightDtype } from '../src/tensor/dtype.js';
import { Random } from '../src/tensor/random.js';
import { weightMatrix, type WeightMatrix } from '../src/tensor/weight-matrix.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { onnxMatmulModel } from './helpers/onnx-matmul-model.js';
import { loadPeerPackage } from './helpers/peers.js';
import { fmt, median, secondsPerCall } from './helpers/timing.js';

interface Case { m: number; k: number; n: number; dtype: WeightDtype }
interface Row extends Case { seconds: number; bandwidth: number; rooflineRatio: number; numpy: number | null; ort: number | null }

const BYTES: Readonly<Record<WeightDtype, number>> = { f32: 4, bf16: 2, f16: 2 };

function cases(quick: boolean): Case[] {
  const list: Case[] = [];
  for (const m of [1, 32]) for (const dtype of ['f32', 'bf16', 'f16'] as const) list.push({ m, k: 4096, n: 4096, dtype });
  const smallShapes: [number, number][] = quick ? [[576, 1536]] : [[576, 1536], [1536, 576]];
  for (const [k, n] of smallShapes) {
    for (const m of [1, 8, 32]) for (const dtype of ['f32', 'bf16'] as const) list.push({ m, k, n, dtype });
  }
  return list;
}

function weightBytes(c: Case): number {
  return c.n * c.k * BYTES[c.dtype];
}

function setsFor(bytes: number, llcBytes: number): number {
  return Math.max(1, Math.ceil((llcBytes * 1.25) / bytes));
}

/**
 * Streaming-read probe: the pool sums a buffer larger than 1 GiB (far beyond the LLC).
 * Returns a function giving one measurement in bytes/s (the best of two reads).
 */
function bandwidthProbe(variant: number): { readBandwidth: () => number; bytes: number } {
  const { addon } = loadNativeAddon();
  const read = addon!.memoryReadSum as (variant: number, data: Float32Array) => number;
  const data = new Float32Array((1.125 * 2 ** 30) / 4).fill(1);
  read(variant, data);
  const readBandwidth = (): number => {
    let best = Infinity;
    for (let i = 0; i < 2; i++) {
      const start = process.hrtime.bigint();
      read(variant, data);
      best = Math.min(best, Number(process.hrtime.bigint() - start) / 1e9);
    }
    return data.byteLength / best;
  };
  return { readBandwidth, bytes: data.byteLength };
}

function makeWeightSets(c: Case, sets: number, random: Random): WeightMatrix[] {
  const values = random.fillNormal(new Float32Array(c.n * c.k), 0.02);
  const first = c.dtype === 'f32' ? values : c.dtype === 'bf16' ? f32ArrayToBf16(values) : f32ArrayToF16(values);
  const out: WeightMatrix[] = [];
  for (let s = 0; s < sets; s++) out.push(weightMatrix(c.dtype, c.n, c.k, s === 0 ? first : first.slice()));
  return out;
}

const NUMPY_SCRIPT = `
import json, sys, time
import numpy as np
cases = json.loads(sys.argv[1])
rng = np.random.default_rng(7)
out = []
for c in cases:
    m, k, n, sets = c["m"], c["k"], c["n"], c["sets"]
    w0 = (rng.standard_normal((n, k), dtype=np.float32) * 0.02)
    ws = [w0] + [w0.copy() for _ in range(sets - 1)]
    x = rng.standard_normal((m, k), dtype=np.float32)
    y = np.empty((m, n), dtype=np.float32)
    call = 0
    def once():
        global call
        np.matmul(x, ws[call % sets].T, out=y)
        call += 1
    for _ in range(2): once()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter(); calls = 0
        while True:
            once(); calls += 1
            el = time.perf_counter() - t0
            if el >= 0.25 and calls >= 3: break
        rounds.append(el / calls)
    rounds.sort()
    out.append(rounds[0])
    del ws, w0
print(json.dumps(out))
`;

/** NumPy f32 seconds per call for each case (same thread count), or the reason it was skipped. */
function runNumpy(list: (Case & { sets: number })[], threads: number): { seconds: number[] | null; note: string } {
  const env: NodeJS.ProcessEnv = { ...process.env, OPENBLAS_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads), MKL_NUM_THREADS: String(threads) };
  // A Haswell core type / small L2 forced in the environment would handicap OpenBLAS on this CPU.
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  try {
    const version = execFileSync('python3', ['-c', 'import numpy; print(numpy.__version__)'], { env, encoding: 'utf8' }).trim();
    const output = execFileSync('python3', ['-c', NUMPY_SCRIPT, JSON.stringify(list)], { env, encoding: 'utf8', maxBuffer: 1 << 20 });
    return { seconds: JSON.parse(output) as number[], note: `NumPy ${version} (np.matmul f32, OPENBLAS_NUM_THREADS=${threads})` };
  } catch (error) {
    return { seconds: null, note: `NumPy skipped: ${error instanceof Error ? error.message.split('\n')[0] : String(error)}` };
  }
}

interface OrtSession { run(feeds: object): Promise<unknown>; release?(): Promise<void> }
interface OrtModule {
  InferenceSession: { create(model: Uint8Array, options: object): Promise<OrtSession> };
  Tensor: new (type: string, data: Float32Array, dims: number[]) => unknown;
  env?: { versions?: { common?: string } };
}

/** onnxruntime-node sessions for one shape, one per weight set, and a timed round over them. */
async function ortSessions(ort: OrtModule, c: Case & { sets: number }, threads: number, random: Random): Promise<{ round: () => Promise<number>; release: () => Promise<void> }> {
  const b = random.fillNormal(new Float32Array(c.k * c.n), 0.02);
  const model = onnxMatmulModel(c.m, c.k, c.n, b);
  // No spinning: with one intra-op pool per session, idle pools spinning after their run would
  // steal the cores from the session that runs next.
  const options = { intraOpNumThreads: threads, interOpNumThreads: 1, executionMode: 'sequential', graphOptimizationLevel: 'all',
    extra: { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } } };
  const sessions: OrtSession[] = [];
  for (let s = 0; s < c.sets; s++) sessions.push(await ort.InferenceSession.create(model, options));
  const feeds = { X: new ort.Tensor('float32', random.fillNormal(new Float32Array(c.m * c.k)), [c.m, c.k]) };
  let call = 0;
  const once = async (): Promise<void> => { await sessions[call++ % sessions.length]!.run(feeds); };
  for (let i = 0; i < 2; i++) await once();
  const round = async (): Promise<number> => {
    const start = process.hrtime.bigint();
    let calls = 0;
    let elapsed = 0;
    do {
      await once();
      calls++;
      elapsed = Number(process.hrtime.bigint() - start) / 1e9;
    } while (elapsed < 0.25 || calls < 3);
    return elapsed / calls;
  };
  const release = async (): Promise<void> => { for (const session of sessions) await session.release?.(); };
  return { round, release };
}

export async function run(args: string[]): Promise<void> {
  const root = repositoryRoot(dirname(fileURLToPath(import.meta.url)));
  const quick = args.includes('--quick');
  const { addon, error } = loadNativeAddon();
  if (!addon) throw new Error(`native addon unavailable: ${error}`);
  const kernels = getKernels();
  const variant = addon.bestVariant();
  const threads = addon.numThreads();
  const llcBytes = Number(process.env.LLC_MB ?? 320) * 2 ** 20;
  process.stderr.write(`kernels bench: ${kernels.name}, ${threads} threads\n`);

  const loadBefore = loadavg()[0]!;
  const probe = bandwidthProbe(variant);
  const { module: ort, error: ortError } = loadPeerPackage<OrtModule>(root, 'onnxruntime-node');
  const ortNote = ort
    ? `onnxruntime-node ${ort.env?.versions?.common ?? ''} (MatMul f32, B an initializer, intraOpNumThreads=${threads}, spinning off; the CPU binary ships in the npm package)`
    : `onnxruntime-node skipped: ${ortError}`;
  let numpyNote = '';
  const list = cases(quick).map((c) => ({ ...c, sets: setsFor(weightBytes(c), llcBytes) }));
  const random = new Random(42);
  const rows: Row[] = [];
  const bandwidths: number[] = [];
  const peerByShape = new Map<string, { numpy: number | null; ort: number | null }>();
  for (const c of list) {
    const shape = `${c.m}x${c.k}x${c.n}`;
    const weights = makeWeightSets(c, c.sets, random);
    const x = random.fillNormal(new Float32Array(c.m * c.k));
    const y = new Float32Array(c.m * c.n);
    // Peers run f32 only (neither has a bf16/f16 CPU matmul), once per shape, at its f32 row.
    const ortPeer = ort && c.dtype === 'f32' ? await ortSessions(ort, c, threads, random) : null;
    // Each round times SOPPU, then the bandwidth right after it, then the ORT peer: on a machine
    // whose load drifts, each comparison is made within seconds; the best round of each is reported.
    const roundSeconds: number[] = [];
    const roundBandwidths: number[] = [];
    const ortSeconds: number[] = [];
    let call = 0;
    for (let r = 0; r < 5; r++) {
      const seconds = secondsPerCall(() => kernels.matmul(y, x, weights[call++ % weights.length]!, c.m), { warmup: r === 0 ? 2 : 0, rounds: 1 });
      const bandwidth = probe.readBandwidth();
      roundSeconds.push(seconds);
      roundBandwidths.push(bandwidth);
      if (ortPeer) ortSeconds.push(await ortPeer.round());
    }
    await ortPeer?.release();
    weights.length = 0;
    let numpySeconds: number | null = null;
    if (c.dtype === 'f32') {
      const numpy = runNumpy([c], threads);
      numpyNote = numpy.note;
      numpySeconds = numpy.seconds?.[0] ?? null;
      peerByShape.set(shape, { numpy: numpySeconds, ort: ortSeconds.length ? Math.min(...ortSeconds) : null });
    }
    const peers = peerByShape.get(shape) ?? { numpy: null, ort: null };
    const seconds = Math.min(...roundSeconds);
    bandwidths.push(...roundBandwidths);
    const bestBandwidth = Math.max(...roundBandwidths);
    rows.push({ ...c, seconds, bandwidth: bestBandwidth, rooflineRatio: seconds / (weightBytes(c) / bestBandwidth), ...peers });
    process.stderr.write(`  ${c.dtype} M=${c.m} K=${c.k} N=${c.n}: soppu ${(seconds * 1e3).toFixed(3)} ms (${fmt(rows[rows.length - 1]!.rooflineRatio)}× roofline), ` +
      `numpy ${fmt(peers.numpy === null ? null : peers.numpy * 1e3)} ms, ort ${fmt(peers.ort === null ? null : peers.ort * 1e3)} ms\n`);
  }
  const bandwidth = median(bandwidths);
  process.stderr.write(`streaming read: ${(bandwidth / 1e9).toFixed(1)} GB/s (median of ${bandwidths.length}); ${numpyNote}; ${ortNote}\n`);

  const table = [
    '| weights | M | K×N | SOPPU ms | GFLOP/s | GB/s (W) | NumPy ms | ORT ms | best peer / SOPPU | SOPPU / roofline |',
    '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    const flops = 2 * r.m * r.k * r.n;
    const bytes = weightBytes(r);
    const peerTimes = [r.numpy, r.ort].filter((v): v is number => v !== null);
    const best = peerTimes.length ? Math.min(...peerTimes) : null;
    table.push(`| ${r.dtype} | ${r.m} | ${r.k}×${r.n} | ${fmt(r.seconds * 1e3)} | ${fmt(flops / r.seconds / 1e9)} | ${fmt(bytes / r.seconds / 1e9)} | ` +
      `${fmt(r.numpy === null ? null : r.numpy * 1e3)} | ${fmt(r.ort === null ? null : r.ort * 1e3)} | ` +
      `${best === null ? '–' : `${fmt(best / r.seconds)}×`} | ${fmt(r.rooflineRatio)}× |`);
  }
  const date = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
  const markdown = [
    '## Kernels: matmul',
    '',
    `Command: \`SOPPU_THREADS=${threads} npm run bench -- kernels${quick ? ' --quick' : ''}\` — ${date}`,
    '',
    `Machine: ${machineDescription()}. Kernel set ${kernels.name}, ${threads} threads; peers use the same thread count.`,
    `Load average (1 min) at start / end: ${loadBefore.toFixed(1)} / ${loadavg()[0]!.toFixed(1)} — above ${cpus().length} the cores were shared with other work and absolute figures are pessimistic; the ratios compare runs made seconds apart.`,
    `Measured streaming-read bandwidth (${threads} threads, 1.125 GiB buffer, ${bandwidths.length} probes taken between the matmul rounds): best **${(Math.max(...bandwidths) / 1e9).toFixed(1)} GB/s**, median ${(bandwidth / 1e9).toFixed(1)} GB/s.`,
    `Weight sets cycled per call so each sweep touches > ${(llcBytes * 1.25 / 2 ** 20).toFixed(0)} MiB (beyond the LLC); ` +
      'the peers cycle the same number of copies. Times are the best of 5 rounds (≥ 0.25 s each) for SOPPU and both peers alike: on a shared machine the best round is the least disturbed one.',
    '',
    ...table,
    '',
    '- *best peer / SOPPU*: > 1 means SOPPU is faster. Peers compute in f32 for every row (neither has a',
    '  bf16/f16 CPU matmul), so bf16/f16 rows compare against the f32 peer of the same shape.',
    '- *SOPPU / roofline*: best time over (weight bytes / best bandwidth probed between that shape\'s rounds); 1.0 is the memory bound.',
    `- Peers: ${numpyNote}; ${ortNote}. ORT rounds alternate with SOPPU rounds in the same process; NumPy runs right after each f32 shape.`,
  ].join('\n');
  process.stdout.write(`${markdown}\n`);
  if (!args.includes('--no-write')) process.stderr.write(`wrote ${writeBenchmarkSection(root, 'kernels', markdown)}\n`);
}
