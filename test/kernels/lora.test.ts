import { describe, expect, it } from 'vitest';
import { refKernels } from '../../src/kernels/index.js';
import { loadNativeAddon } from '../../src/kernels/native-addon.js';
import type { KernelSet, LoraCore, LoraRows, LoraSegment, MatmulGroupPart } from '../../src/kernels/kernel-set.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { f32ToBf16, f32ToF16 } from '../../src/tensor/dtype.js';
import { weightMatrix, type WeightMatrix } from '../../src/tensor/weight-matrix.js';
import { Random } from '../../src/tensor/random.js';
import { expectClose, expectRowsUntouched, nativeSets, offsetCopy, randomArray } from './ops-compare.js';

const TOLERANCE = 2e-5;

interface SegmentCase {
  name: string;
  k: number;
  n: number;
  /** [start, end, rank] per segment; rows outside every segment are base-model rows. */
  segments: [number, number, number][];
}

const CASES: SegmentCase[] = [
  { name: 'odd: k 33 n 17, ranks 1 and 7 with gaps', k: 33, n: 17, segments: [[1, 3, 1], [4, 9, 7]] },
  { name: 'SmolLM 576, ranks 16 and 64, decode rows', k: 576, n: 576, segments: [[0, 1, 16], [2, 3, 64], [3, 4, 16]] },
  { name: 'Qwen 896 → 128, rank 7 prefill', k: 896, n: 128, segments: [[1, 11, 7]] },
  { name: 'Llama-1B 2048, rank 256', k: 2048, n: 2048, segments: [[0, 2, 256], [3, 5, 1]] },
  { name: 'Llama-8B 4096, ranks 16 and 64', k: 4096, n: 4096, segments: [[1, 2, 16], [2, 6, 64]] },
];

function rowsOf(segments: readonly [number, number, number][]): number {
  return Math.max(...segments.map((s) => s[1])) + 1; // one trailing base-model row
}

function gapRows(segments: readonly [number, number, number][], rows: number): number[] {
  return Array.from({ length: rows }, (_, r) => r).filter((r) => !segments.some(([s, e]) => r >= s && r < e));
}

/** W [n, k] of a dtype. */
function weights(rng: Random, dtype: 'f32' | 'bf16' | 'f16', n: number, k: number): WeightMatrix {
  const values = randomArray(rng, n * k, 1 / Math.sqrt(k));
  if (dtype === 'f32') return weightMatrix('f32', n, k, offsetCopy(values));
  return weightMatrix(dtype, n, k, offsetCopy(Uint16Array.from(values, dtype === 'bf16' ? f32ToBf16 : f32ToF16)));
}

/** `build()` once per key, kept in `cache`: a case's inputs and reference result, shared by the variants (large shapes are slow in TS). */
function builtOnce<T>(cache: Map<string, T>, key: string, build: () => T): T {
  let hit = cache.get(key);
  if (hit === undefined) cache.set(key, (hit = build()));
  return hit;
}

type MatmulLoraCase = ReturnType<typeof applyCase> & { w: WeightMatrix; x: Float32Array; want: Float32Array };
const matmulLoraCases = new Map<string, MatmulLoraCase>();

/** A matmulLora case's inputs and reference result. */
function matmulLoraCase(spec: SegmentCase, dtype: 'f32' | 'bf16'): MatmulLoraCase {
  return builtOnce(matmulLoraCases, `${spec.name}/${dtype}`, () => {
    const rng = new Random(23);
    const inputs = applyCase(rng, spec, dtype);
    const w = weights(rng, dtype, spec.n, spec.k);
    const x = randomArray(rng, inputs.rows * spec.k);
    const want = new Float32Array(inputs.rows * spec.n);
    refKernels.matmulLora(want, x, w, inputs.rows, inputs.segments, inputs.cores);
    return { ...inputs, w, x, want };
  });
}

interface GroupCase {
  name: string;
  k: number;
  rows: number;
  /** Per part its N and, for a part with adapters, segments as SegmentCase has them. */
  parts: { n: number; segments?: [number, number, number][] }[];
}

const GROUP_CASES: GroupCase[] = [
  { name: 'odd: k 33, n 17 / 5 / 40, 4 rows, adapters on the first', k: 33, rows: 4, parts: [{ n: 17, segments: [[0, 2, 3]] }, { n: 5 }, { n: 40 }] },
  { name: 'SmolLM q, k, v at one decode row, adapters on q and v', k: 576, rows: 1, parts: [{ n: 576, segments: [[0, 1, 16]] }, { n: 192 }, { n: 192, segments: [[0, 1, 8]] }] },
  { name: 'SmolLM gate and up at 17 rows (past the streaming split), every row adapted', k: 576, rows: 17, parts: [{ n: 1536, segments: [[0, 9, 16], [9, 17, 8]] }, { n: 1536, segments: [[0, 17, 16]] }] },
  { name: 'Qwen 896 q, k, v at 5 rows, no adapters', k: 896, rows: 5, parts: [{ n: 896 }, { n: 128 }, { n: 128 }] },
  { name: 'prefill: 150 rows over several row blocks', k: 96, rows: 150, parts: [{ n: 200, segments: [[0, 70, 8], [71, 149, 5]] }, { n: 24 }] },
];

type BuiltGroup = { x: Float32Array; parts: MatmulGroupPart[]; want: Float32Array[] };
const groupCases = new Map<string, BuiltGroup>();

/** A matmulGroup case's inputs and the reference result per part. */
function groupCase(spec: GroupCase, dtype: 'f32' | 'bf16'): BuiltGroup {
  return builtOnce(groupCases, `${spec.name}/${dtype}`, () => {
    const rng = new Random(41);
    const x = randomArray(rng, spec.rows * spec.k);
    const parts = spec.parts.map(({ n, segments }): MatmulGroupPart => {
      const w = weights(rng, dtype, n, spec.k);
      const y = new Float32Array(spec.rows * n);
      if (!segments) return { y, w };
      const adapted = applyCase(rng, { name: spec.name, k: spec.k, n, segments }, dtype);
      return { y, w, segments: adapted.segments, cores: adapted.cores.slice(0, spec.rows) };
    });
    refKernels.matmulGroup(x, spec.rows, parts);
    return { x, parts, want: parts.map((part) => part.y.slice()) };
  });
}

function f32Matrix(rng: Random, rows: number, cols: number, std: number): WeightMatrix {
  return weightMatrix('f32', rows, cols, offsetCopy(randomArray(rng, rows * cols, std)));
}

it('the addon provides native LoRA segment ops in every supported variant', () => {
  expect(nativeSets.length).toBeGreaterThan(0);
  for (const set of nativeSets) {
    expect(set.loraShrink).not.toBe(refKernels.loraShrink);
    expect(set.loraExpand).not.toBe(refKernels.loraExpand);
    expect(set.loraCore).not.toBe(refKernels.loraCore);
    expect(set.loraApply).not.toBe(refKernels.loraApply);
    expect(set.matmulLora).not.toBe(refKernels.matmulLora);
    expect(set.matmulGroup).not.toBe(refKernels.matmulGroup);
    expect(set.loraRows).not.toBe(refKernels.loraRows);
  }
});

/**
 * Segments of a case with both factors, and per row a core: none, full or diagonal in turn. Factors and
 * cores in `dtype`, as the engine stores them.
 */
function applyCase(rng: Random, spec: SegmentCase, dtype: 'f32' | 'bf16' | 'f16' = 'f32'): { segments: LoraSegment[]; cores: (LoraCore | undefined)[]; rows: number } {
  const matrix = (rows: number, cols: number, std: number): WeightMatrix => {
    const values = randomArray(rng, rows * cols, std);
    if (dtype === 'f32') return weightMatrix('f32', rows, cols, offsetCopy(values));
    const toBits = dtype === 'bf16' ? f32ToBf16 : f32ToF16;
    return weightMatrix(dtype, rows, cols, offsetCopy(Uint16Array.from(values, toBits)));
  };
  const core = (rank: number, diagonal: boolean, std: number): LoraCore => {
    const values = randomArray(rng, diagonal ? rank : rank * rank, std);
    if (dtype === 'f32') return { rank, diagonal, data: values };
    return { rank, diagonal, dtype, data: Uint16Array.from(values, dtype === 'bf16' ? f32ToBf16 : f32ToF16) };
  };
  const rows = rowsOf(spec.segments);
  const cores: (LoraCore | undefined)[] = new Array<LoraCore | undefined>(rows);
  const segments = spec.segments.map(([start, end, rank]) => {
    for (let r = start; r < end; r++) {
      const kind = r % 3;
      if (kind === 1) cores[r] = core(rank, false, 0.5);
      if (kind === 2) cores[r] = core(rank, true, 1);
    }
    return { start, end, a: matrix(rank, spec.k, 1 / Math.sqrt(spec.k)), bt: matrix(rank, spec.n, 0.5) };
  });
  return { segments, cores, rows };
}

it('ref matmulGroup is matmul or matmulLora per part, and rejects a part of another K', () => {
  const { x, parts, want } = groupCase(GROUP_CASES[0]!, 'f32');
  parts.forEach((part, i) => {
    const alone = new Float32Array(part.y.length);
    if (part.segments) refKernels.matmulLora(alone, x, part.w, GROUP_CASES[0]!.rows, part.segments, part.cores ?? []);
    else refKernels.matmul(alone, x, part.w, GROUP_CASES[0]!.rows);
    expect(Array.from(want[i]!)).toEqual(Array.from(alone));
  });
  const other = weightMatrix('f32', 2, 5, new Float32Array(10));
  expect(() => refKernels.matmulGroup(x, 1, [parts[1]!, { y: new Float32Array(2), w: other }])).toThrow(/matmulGroup: part 1 has K = 5, part 0 has 33/);
});

it('ref loraApply equals loraShrink, loraCore and loraExpand in turn', () => {
  const rng = new Random(21);
  const spec = CASES[0]!;
  const { segments, cores, rows } = applyCase(rng, spec);
  const stride = Math.max(...spec.segments.map((s) => s[2]));
  const x = randomArray(rng, rows * spec.k);
  const yStart = randomArray(rng, rows * spec.n);
  const want = yStart.slice();
  const t = new Float32Array(rows * stride);
  refKernels.loraShrink(t, stride, x, spec.k, segments);
  const u = t.slice(); // rows without a core pass t through
  refKernels.loraCore(u, t, stride, rows, cores);
  refKernels.loraExpand(want, spec.n, u, stride, segments);
  const got = yStart.slice();
  refKernels.loraApply(got, spec.n, x, spec.k, segments, cores);
  expectClose(got, want, 1e-5, 'ref loraApply');
});


it('ref loraRows: per segment in order, one segment per run of new rows mapping into it; rows keep their cores', () => {
  const rng = new Random(29);
  const { segments, cores } = applyCase(rng, CASES[0]!); // segments [1, 3) and [4, 9); rows 0, 3 and 9 are base rows
  // new row i is old row rowOf[i]: reordered, repeated, base (−1 and old row 3) and beyond the old rows (12)
  const rowOf = Int32Array.from([5, 6, 1, 2, 2, -1, 3, 8, 12, 4]);
  const carried = refKernels.loraRows(segments, cores, rowOf);
  expect(carried.segments.map((s) => [s.start, s.end])).toEqual([[2, 5], [0, 2], [7, 8], [9, 10]]);
  expect(carried.segments.map((s) => s.a)).toEqual([segments[0]!.a, segments[1]!.a, segments[1]!.a, segments[1]!.a]);
  expect(carried.segments.every((s, i) => s.bt === segments[i === 0 ? 0 : 1]!.bt)).toBe(true);
  for (const i of [0, 1, 2, 3, 4, 7, 9]) expect(carried.cores[i]).toBe(cores[rowOf[i]!]);
  for (const i of [5, 6, 8]) expect(carried.cores[i]).toBeUndefined();
  // added work on rows 5, 6 and 8: joins in row order; rows 6 and 8 join [7, 8) and [9, 10) over segment 1's factors
  const addedCore: LoraCore = { rank: 7, diagonal: true, data: new Float32Array(7).fill(0.5) };
  const joined = refKernels.loraRows(segments, cores, rowOf, {
    segments: [{ start: 5, end: 6, a: segments[0]!.a, bt: segments[1]!.bt }, { start: 6, end: 7, a: segments[1]!.a, bt: segments[1]!.bt },
      { start: 8, end: 9, a: segments[1]!.a, bt: segments[1]!.bt }],
    cores: [undefined, undefined, undefined, undefined, undefined, undefined, addedCore, undefined, addedCore],
  });
  expect(joined.segments.map((s) => [s.start, s.end])).toEqual([[0, 2], [2, 5], [5, 6], [6, 10]]);
  expect(joined.cores[6]).toBe(addedCore);
  expect(joined.cores[8]).toBe(addedCore);
  expect(joined.cores[7]).toBe(cores[8]);
});

/**
 * matmulLora of carried work (from loraRows: the kernels' plan carried over) and of fresh arrays over the same
 * factors and cores (a plan built for them): the two must agree bit for bit. Returns the carried result.
 */
function expectCarriedAsBuilt(native: KernelSet, x: Float32Array, w: WeightMatrix, rows: number, carried: LoraRows): Float32Array {
  const got = new Float32Array(rows * w.rows);
  native.matmulLora(got, x, w, rows, carried.segments, carried.cores);
  const fresh = new Float32Array(rows * w.rows);
  native.matmulLora(fresh, x, w, rows, carried.segments.map((s) => ({ ...s })), [...carried.cores]);
  expect(Array.from(got)).toEqual(Array.from(fresh));
  return got;
}

describe.each(nativeSets.map((set) => [set.name, set] as const))('%s LoRA ops vs ref', (_name, native) => {
  it.each(CASES.map((c) => [c.name, c] as const))('shrink and expand: %s', (_caseName, spec) => {
    const rng = new Random(11);
    const rows = rowsOf(spec.segments);
    const maxRank = Math.max(...spec.segments.map((s) => s[2]));
    const tStride = maxRank + 3;
    const segments: LoraSegment[] = spec.segments.map(([start, end, rank]) => ({
      start, end,
      a: f32Matrix(rng, rank, spec.k, 1 / Math.sqrt(spec.k)),
      bt: f32Matrix(rng, rank, spec.n, 0.5),
    }));
    const x = randomArray(rng, rows * spec.k);
    const tStart = randomArray(rng, rows * tStride); // not zero: untouched entries must keep their bits

    const wantT = tStart.slice();
    refKernels.loraShrink(wantT, tStride, x, spec.k, segments);
    const t = offsetCopy(tStart);
    native.loraShrink(t, tStride, offsetCopy(x), spec.k, segments);
    expectClose(t, wantT, TOLERANCE, 'loraShrink');
    expectRowsUntouched(t, tStart, tStride, gapRows(spec.segments, rows), 'loraShrink');

    const yStart = randomArray(rng, rows * spec.n);
    const wantY = yStart.slice();
    refKernels.loraExpand(wantY, spec.n, wantT, tStride, segments);
    const y = offsetCopy(yStart);
    native.loraExpand(y, spec.n, offsetCopy(wantT), tStride, segments);
    expectClose(y, wantY, TOLERANCE, 'loraExpand');
    expectRowsUntouched(y, yStart, spec.n, gapRows(spec.segments, rows), 'loraExpand');
  });

  it('overlapping segments apply one after another, as the reference does', () => {
    const rng = new Random(5);
    const k = 40;
    const n = 24;
    const segments: LoraSegment[] = [[0, 6, 4], [3, 9, 4], [2, 4, 8]].map(([start, end, rank]) => ({
      start: start!, end: end!, a: f32Matrix(rng, rank!, k, 0.3), bt: f32Matrix(rng, rank!, n, 0.3),
    }));
    const x = randomArray(rng, 9 * k);
    const t = randomArray(rng, 9 * 8);
    const wantT = t.slice();
    refKernels.loraShrink(wantT, 8, x, k, segments);
    native.loraShrink(t, 8, x, k, segments);
    expectClose(t, wantT, TOLERANCE, 'overlapping shrink');
    const y = randomArray(rng, 9 * n);
    const wantY = y.slice();
    refKernels.loraExpand(wantY, n, wantT, 8, segments);
    native.loraExpand(y, n, wantT, 8, segments);
    expectClose(y, wantY, TOLERANCE, 'overlapping expand');
  });

  it.each(['bf16', 'f16'] as const)('%s factors (widened in registers) match the reference', (dtype) => {
    const rng = new Random(9);
    const k = 40;
    const n = 150; // more than one expand tile of outputs
    const toBits = dtype === 'bf16' ? f32ToBf16 : f32ToF16;
    const matrix = (rows: number, cols: number): WeightMatrix =>
      weightMatrix(dtype, rows, cols, offsetCopy(Uint16Array.from(randomArray(rng, rows * cols, 0.2), toBits)));
    const segments: LoraSegment[] = [
      { start: 1, end: 3, a: matrix(19, k), bt: matrix(19, n) },
      { start: 3, end: 8, a: weightMatrix('f32', 5, k, randomArray(rng, 5 * k)), bt: weightMatrix('f32', 5, n, randomArray(rng, 5 * n)) },
    ];
    const x = randomArray(rng, 9 * k);
    const t = new Float32Array(9 * 20);
    const wantT = t.slice();
    refKernels.loraShrink(wantT, 20, x, k, segments);
    native.loraShrink(t, 20, x, k, segments);
    expectClose(t, wantT, TOLERANCE, `${dtype} shrink`);
    const y = randomArray(rng, 9 * n);
    const wantY = y.slice();
    refKernels.loraExpand(wantY, n, wantT, 20, segments);
    native.loraExpand(y, n, wantT, 20, segments);
    expectClose(y, wantY, TOLERANCE, `${dtype} expand`);
  });

  it.each([1, 7, 16, 64, 256].flatMap((rank) => (['f32', 'bf16', 'f16'] as const).map((dtype) => [rank, dtype] as const)))('core rank %i, %s: full and diagonal per row, null rows untouched', (rank, dtype) => {
    const rng = new Random(rank);
    const stride = rank + 2;
    const rows = 7;
    // 16-bit cores hold raw bits, widened as read (as the engine stores them for a 16-bit model)
    const core = (coreRank: number, isDiagonal: boolean, values: Float32Array): LoraCore => dtype === 'f32'
      ? { rank: coreRank, diagonal: isDiagonal, data: values }
      : { rank: coreRank, diagonal: isDiagonal, dtype, data: offsetCopy(Uint16Array.from(values, dtype === 'bf16' ? f32ToBf16 : f32ToF16)) };
    const full = core(rank, false, offsetCopy(randomArray(rng, rank * rank, 0.5)));
    const diagonal = core(rank, true, offsetCopy(randomArray(rng, rank, 2)));
    const smaller = core(Math.max(1, rank - 3), false, randomArray(rng, Math.max(1, rank - 3) ** 2));
    const cores = [full, null, diagonal, full, undefined, smaller]; // row 6 beyond the array: untouched too
    const t = randomArray(rng, rows * stride);
    const outStart = randomArray(rng, rows * stride);
    const want = outStart.slice();
    refKernels.loraCore(want, t, stride, rows, cores);
    const out = offsetCopy(outStart);
    native.loraCore(out, offsetCopy(t), stride, rows, cores);
    expectClose(out, want, TOLERANCE, 'loraCore');
    expectRowsUntouched(out, outStart, stride, [1, 4, 6], 'loraCore');
  });

  it.each(CASES.flatMap((c) => (['f32', 'bf16'] as const).map((dtype) => [c.name, dtype, c] as const)))('loraApply (shrink, core, expand in one call): %s, %s factors', (_caseName, dtype, spec) => {
    const rng = new Random(13);
    const { segments, cores, rows } = applyCase(rng, spec, dtype);
    const x = randomArray(rng, rows * spec.k);
    const yStart = randomArray(rng, rows * spec.n);
    const want = yStart.slice();
    refKernels.loraApply(want, spec.n, x, spec.k, segments, cores);
    const y = offsetCopy(yStart);
    native.loraApply(y, spec.n, offsetCopy(x), spec.k, segments, cores);
    expectClose(y, want, TOLERANCE, 'loraApply');
    expectRowsUntouched(y, yStart, spec.n, gapRows(spec.segments, rows), 'loraApply');
  });

  it.each(['bf16', 'f16'] as const)('loraApply with %s factors, overlapping segments and many segments', (dtype) => {
    const rng = new Random(17);
    const spec: SegmentCase = { name: dtype, k: 70, n: 150, segments: [[0, 6, 4], [3, 9, 4], [9, 10, 19], ...Array.from({ length: 20 }, (_, i) => [10 + i, 11 + i, 3] as [number, number, number])] };
    const { segments, cores, rows } = applyCase(rng, spec, dtype);
    const x = randomArray(rng, rows * spec.k);
    const yStart = randomArray(rng, rows * spec.n);
    const want = yStart.slice();
    refKernels.loraApply(want, spec.n, x, spec.k, segments, cores);
    const y = offsetCopy(yStart);
    native.loraApply(y, spec.n, x, spec.k, segments, cores);
    expectClose(y, want, TOLERANCE, `${dtype} loraApply`);
  });

  it.each(CASES.flatMap((c) => (['f32', 'bf16'] as const).map((dtype) => [c.name, dtype, c] as const)))('matmulLora (x·Wᵀ and every row\'s delta in one job): %s, %s weights and factors', (_caseName, dtype, spec) => {
    const { segments, cores, rows, w, x, want } = matmulLoraCase(spec, dtype);
    const y = offsetCopy(randomArray(new Random(5), rows * spec.n)); // overwritten, not accumulated
    native.matmulLora(y, offsetCopy(x), w, rows, segments, cores);
    expectClose(y, want, TOLERANCE, 'matmulLora');
    // base-model rows hold x·Wᵀ alone
    const base = new Float32Array(rows * spec.n);
    native.matmul(base, x, w, rows);
    for (const r of gapRows(spec.segments, rows)) expect(Array.from(y.subarray(r * spec.n, (r + 1) * spec.n))).toEqual(Array.from(base.subarray(r * spec.n, (r + 1) * spec.n)));
  });

  it.each([
    ['prefill: 150 rows over several row blocks', { name: 'prefill', k: 96, n: 200, segments: [[0, 70, 8], [70, 140, 16], [141, 149, 5]] }],
    ['overlapping segments and many one-row segments', { name: 'overlap', k: 70, n: 150, segments: [[0, 6, 4], [3, 9, 4], [9, 10, 19], ...Array.from({ length: 20 }, (_, i) => [10 + i, 11 + i, 3])] }],
  ] as [string, SegmentCase][])('matmulLora: %s (f16 weights and factors)', (_name, spec) => {
    const rng = new Random(29);
    const { segments, cores, rows } = applyCase(rng, spec, 'f16');
    const w = weights(rng, 'f16', spec.n, spec.k);
    const x = randomArray(rng, rows * spec.k);
    const want = new Float32Array(rows * spec.n);
    refKernels.matmulLora(want, x, w, rows, segments, cores);
    const y = new Float32Array(rows * spec.n);
    native.matmulLora(y, x, w, rows, segments, cores);
    expectClose(y, want, TOLERANCE, 'matmulLora');
  });

  it('matmulLora rejects segments beyond its rows, and a weight shorter than its shape', () => {
    const rng = new Random(31);
    const spec: SegmentCase = { name: 'small', k: 10, n: 6, segments: [[0, 3, 4]] };
    const { segments, cores } = applyCase(rng, spec);
    const w = weights(rng, 'f32', 6, 10);
    expect(() => native.matmulLora(new Float32Array(2 * 6), new Float32Array(2 * 10), w, 2, segments, cores)).toThrow(/matmulLora: segments reach row 3, the batch has 2 rows/);
    const short = { ...w, data: w.data.subarray(1) } as WeightMatrix;
    expect(() => native.matmulLora(new Float32Array(4 * 6), new Float32Array(4 * 10), short, 4, segments, cores)).toThrow(/matmulLora: w \(f32 \[6, 10\]\) has 59 elements, needs 60/);
  });

  it.each(GROUP_CASES.flatMap((c) => (['f32', 'bf16'] as const).map((dtype) => [c.name, dtype, c] as const)))('matmulGroup (one job over several linears of one x): %s, %s', (_caseName, dtype, spec) => {
    const { x, parts, want } = groupCase(spec, dtype);
    const ys = parts.map((part) => offsetCopy(randomArray(new Random(7), part.y.length))); // overwritten, not accumulated
    native.matmulGroup(offsetCopy(x), spec.rows, parts.map((part, i) => ({ ...part, y: ys[i]! })));
    parts.forEach((part, i) => {
      expectClose(ys[i]!, want[i]!, TOLERANCE, `matmulGroup part ${i}`);
      // the same arithmetic as the part's own call: a group changes only how the work is scheduled
      const alone = new Float32Array(part.y.length);
      if (part.segments) native.matmulLora(alone, x, part.w, spec.rows, part.segments, part.cores ?? []);
      else native.matmul(alone, x, part.w, spec.rows);
      expect(Array.from(ys[i]!), `part ${i} against its own call`).toEqual(Array.from(alone));
    });
  });

  it('matmulGroup rejects parts of another K, too many parts, and segments beyond its rows, naming the part', () => {
    const rng = new Random(37);
    const spec: SegmentCase = { name: 'small', k: 10, n: 6, segments: [[0, 3, 4]] };
    const { segments, cores } = applyCase(rng, spec);
    const w = weights(rng, 'f32', 6, 10);
    const y = (): Float32Array => new Float32Array(4 * 6);
    const x = new Float32Array(4 * 10);
    expect(() => native.matmulGroup(x, 4, [{ y: y(), w }, { y: y(), w: weights(rng, 'f32', 6, 9) }])).toThrow(/matmulGroup: part 1: w has K = 9, part 0 has 10/);
    expect(() => native.matmulGroup(x, 4, Array.from({ length: 9 }, () => ({ y: y(), w })))).toThrow(/matmulGroup: 9 parts, at most 8/);
    expect(() => native.matmulGroup(x, 2, [{ y: y(), w }, { y: y(), w, segments, cores }])).toThrow(/matmulGroup: part 1: segments reach row 3, the batch has 2 rows/);
    expect(() => native.matmulGroup(x, 4, [{ y: new Float32Array(5), w }])).toThrow(/matmulGroup: y has 5 elements, needs 24/);
  });

  it.each(['f32', 'bf16'] as const)('%s: loraRows carries a checked plan over to new rows, with the result of a plan built for them', (dtype) => {
    const rng = new Random(31);
    for (const spec of [CASES[0]!, CASES[1]!, { name: 'clusters of prefill rows', k: 64, n: 48, segments: [[0, 12, 8], [12, 20, 8], [20, 32, 4]] } as SegmentCase]) {
      const old = applyCase(rng, spec, dtype);
      const w = weights(rng, dtype, spec.n, spec.k);
      const oldX = randomArray(rng, old.rows * spec.k);
      native.matmulLora(new Float32Array(old.rows * spec.n), oldX, w, old.rows, old.segments, old.cores); // its plan is kept
      const rows = old.rows + 3;
      // decode-like (each run's first row), reordered, repeated, base rows and rows beyond the old batch
      const rowOf = Int32Array.from({ length: rows }, (_, i) => (i % 5 === 4 ? -1 : (i * 7) % (old.rows + 2)));
      const carried = native.loraRows(old.segments, old.cores, rowOf);
      const wanted = refKernels.loraRows(old.segments, old.cores, rowOf);
      expect(carried.segments.map((s) => [s.start, s.end, s.a, s.bt])).toEqual(wanted.segments.map((s) => [s.start, s.end, s.a, s.bt]));
      const x = randomArray(rng, rows * spec.k);
      const got = expectCarriedAsBuilt(native, x, w, rows, carried);
      const want = new Float32Array(rows * spec.n);
      refKernels.matmulLora(want, x, w, rows, wanted.segments, wanted.cores);
      expectClose(got, want, dtype === 'f32' ? TOLERANCE : 1e-3, `${spec.name} carried`);
      // work added on the rows that map to nothing (every fifth): joins the carried plan natively
      const addedCores = new Array<LoraCore | undefined>(rows);
      const added = { segments: [] as LoraSegment[], cores: addedCores };
      const addedFactors = applyCase(rng, { ...spec, segments: [[0, 1, old.segments[0]!.a!.rows]] }, dtype);
      for (let i = 4; i < rows; i += 5) {
        added.segments.push({ start: i, end: i + 1, a: addedFactors.segments[0]!.a, bt: addedFactors.segments[0]!.bt });
        addedCores[i] = i % 2 ? old.cores.find((c) => c && !c.diagonal) : undefined;
      }
      const joined = native.loraRows(old.segments, old.cores, rowOf, added);
      const joinedWant = refKernels.loraRows(old.segments, old.cores, rowOf, added);
      const joinedGot = expectCarriedAsBuilt(native, x, w, rows, joined);
      const joinedRef = new Float32Array(rows * spec.n);
      refKernels.matmulLora(joinedRef, x, w, rows, joinedWant.segments, joinedWant.cores);
      expectClose(joinedGot, joinedRef, dtype === 'f32' ? TOLERANCE : 1e-3, `${spec.name} carried and added`);
      const applied = randomArray(rng, rows * spec.n);
      const appliedWant = applied.slice();
      native.loraApply(applied, spec.n, x, spec.k, carried.segments, carried.cores);
      refKernels.loraApply(appliedWant, spec.n, x, spec.k, wanted.segments, wanted.cores);
      expectClose(applied, appliedWant, dtype === 'f32' ? TOLERANCE : 1e-3, `${spec.name} carried loraApply`);
    }
  });

  it.each(['f32', 'bf16'] as const)('%s: added work over the same factors as a carried run merges with it, as a plan built for the rows has it', (dtype) => {
    const rng = new Random(43);
    const spec: SegmentCase = { name: 'one cluster run of 8 rows', k: 576, n: 96, segments: [[0, 8, 16]] };
    const old = applyCase(rng, spec, dtype);
    const w = weights(rng, dtype, spec.n, spec.k);
    native.matmulLora(new Float32Array(old.rows * spec.n), randomArray(rng, old.rows * spec.k), w, old.rows, old.segments, old.cores);
    // row 3 is new (an adapter that arrived, in the same cluster): the eight rows are one run again
    const rowOf = Int32Array.from([0, 1, 2, -1, 3, 4, 5, 6]);
    const added = { segments: [{ start: 3, end: 4, a: old.segments[0]!.a, bt: old.segments[0]!.bt }], cores: [undefined, undefined, undefined, old.cores[7]] };
    const joined = native.loraRows(old.segments, old.cores, rowOf, added);
    expect(joined.segments.map((s) => [s.start, s.end])).toEqual([[0, 8]]);
    expectCarriedAsBuilt(native, randomArray(rng, 8 * spec.k), w, 8, joined); // the same row tiles, so the same sums
  });

  it('loraRows carries overlapping segments over, still applied one after another', () => {
    const rng = new Random(37);
    const k = 40;
    const n = 24;
    const segments: LoraSegment[] = [[0, 6, 4], [3, 9, 4], [2, 4, 8]].map(([start, end, rank]) => ({
      start: start!, end: end!, a: f32Matrix(rng, rank!, k, 0.3), bt: f32Matrix(rng, rank!, n, 0.3),
    }));
    const cores = new Array<LoraCore | undefined>(9);
    native.loraApply(new Float32Array(9 * n), n, randomArray(rng, 9 * k), k, segments, cores);
    const rowOf = Int32Array.from([3, 2, 8, 0, 5, 3]);
    const carried = native.loraRows(segments, cores, rowOf);
    const x = randomArray(rng, rowOf.length * k);
    const y = randomArray(rng, rowOf.length * n);
    const want = y.slice();
    native.loraApply(y, n, x, k, carried.segments, carried.cores);
    refKernels.loraApply(want, n, x, k, carried.segments, carried.cores);
    expectClose(y, want, TOLERANCE, 'overlapping carried');
  });

  it('loraRows rejects a rowOf that is not an Int32Array with a KERNEL error', () => {
    const rng = new Random(41);
    const { segments, cores } = applyCase(rng, CASES[0]!);
    let caught: unknown;
    try {
      native.loraRows(segments, cores, [0, 1] as unknown as Int32Array);
    } catch (e) {
      caught = e;
    }
    expect(isSoppuError(caught) && caught.code === 'KERNEL' && /rowOf must be an Int32Array/.test(caught.message)).toBe(true);
  });

  it('loraApply called again with the same segments array and new cores uses the new cores', () => {
    const rng = new Random(19);
    const spec = CASES[1]!;
    const first = applyCase(rng, spec);
    const otherCores = first.cores.map((core) => core && { ...core, data: randomArray(rng, core.data.length, 0.5) });
    const x = randomArray(rng, first.rows * spec.k);
    for (const cores of [first.cores, otherCores, first.cores]) {
      const want = new Float32Array(first.rows * spec.n);
      refKernels.loraApply(want, spec.n, x, spec.k, first.segments, cores);
      const y = new Float32Array(first.rows * spec.n);
      native.loraApply(y, spec.n, x, spec.k, first.segments, cores);
      expectClose(y, want, TOLERANCE, 'loraApply with swapped cores');
    }
  });

  it('a core on a row outside every segment is not read, as the reference does not (loraApply, matmulLora, matmulGroup)', () => {
    const rng = new Random(23);
    const [k, n, rank] = [24, 20, 4];
    const segments: LoraSegment[] = [[0, 1], [2, 3]].map(([start, end]) => ({ start: start!, end: end!, a: f32Matrix(rng, rank, k, 0.3), bt: f32Matrix(rng, rank, n, 0.3) }));
    const good = { rank, diagonal: false, data: randomArray(rng, rank * rank, 0.5) };
    const cores = [good, { rank, diagonal: false, data: new Float32Array(3) }, good]; // row 1: malformed, in the gap
    const x = randomArray(rng, 3 * k);
    const want = new Float32Array(3 * n);
    refKernels.loraApply(want, n, x, k, segments, cores);
    const y = new Float32Array(3 * n);
    native.loraApply(y, n, x, k, segments, cores);
    expectClose(y, want, TOLERANCE, 'loraApply, a gap row with a core');
    const w = f32Matrix(rng, n, k, 0.3);
    const wantLinear = new Float32Array(3 * n);
    refKernels.matmulLora(wantLinear, x, w, 3, segments, cores);
    const linear = new Float32Array(3 * n);
    native.matmulGroup(x, 3, [{ y: linear, w, segments, cores }]);
    expectClose(linear, wantLinear, TOLERANCE, 'matmulGroup, a gap row with a core');
  });

  it('loraApply rejects a core whose rank is not its segment rank, and factors of different ranks', () => {
    const rng = new Random(3);
    const a = f32Matrix(rng, 4, 10, 1);
    const bt = f32Matrix(rng, 4, 6, 1);
    const y = new Float32Array(2 * 6);
    const x = new Float32Array(2 * 10);
    const run = (segments: LoraSegment[], cores: (LoraCore | undefined)[]): string => {
      try {
        native.loraApply(y, 6, x, 10, segments, cores);
        return 'accepted';
      } catch (e) {
        expect(isSoppuError(e, 'KERNEL')).toBe(true);
        return (e as Error).message;
      }
    };
    expect(run([{ start: 0, end: 2, a, bt }], [undefined, { rank: 3, diagonal: true, data: new Float32Array(3) }]))
      .toMatch(/loraApply: row 1 has a core of rank 3, its segment rank 4/);
    expect(run([{ start: 0, end: 2, a, bt: f32Matrix(rng, 5, 6, 1) }], [])).toMatch(/loraApply: segment 0: a has rank 4, bt has rank 5/);
    expect(run([{ start: 0, end: 2, a }], [])).toMatch(/loraApply: segment 0 has no bt/);
    expect(run([{ start: 0, end: 3, a, bt }], [])).toMatch(/loraApply: y has 12 elements, needs 18/);
  });

  it("the addon's loraApply takes only a plan from loraApplyPlan, and checks y and x against it", () => {
    const { addon } = loadNativeAddon();
    const apply = addon!.loraApply as (...args: unknown[]) => void;
    const plan = addon!.loraApplyPlan as (...args: unknown[]) => unknown;
    const rng = new Random(4);
    const a = randomArray(rng, 4 * 10), bt = randomArray(rng, 4 * 6);
    const i32 = (...values: number[]): Int32Array => Int32Array.from(values);
    // one segment, rows [0, 2), rank 4, f32 factors, no cores
    const handle = plan(0, 6, 10, 2, i32(0), i32(2), [a], i32(4), i32(0), [bt], i32(4), i32(0), i32(-1, -1), [], i32(), i32(), i32());
    expect(() => apply(0, new Float32Array(12), new Float32Array(20), {})).toThrow(/loraApply: plan must come from loraApplyPlan/);
    expect(() => apply(0, new Float32Array(11), new Float32Array(20), handle)).toThrow(/loraApply: y has 11 elements, needs 12/);
    expect(() => apply(0, new Float32Array(12), new Float32Array(19), handle)).toThrow(/loraApply: x has 19 elements, needs 20/);
    expect(() => plan(0, 6, 10, 2, i32(0), i32(3), [a], i32(4), i32(0), [bt], i32(4), i32(0), i32(-1, -1), [], i32(), i32(), i32()))
      .toThrow(/loraApply: segment 0: rows \[0, 3\) outside \[0, 2\)/);
    expect(() => plan(0, 6, 10, 2, i32(0), i32(2), [a.subarray(1)], i32(4), i32(0), [bt], i32(4), i32(0), i32(-1, -1), [], i32(), i32(), i32()))
      .toThrow(/loraApply: segment 0: a has 39 elements, needs 40/);
    expect(() => plan(0, 6, 10, 2, i32(0), i32(2), [a], i32(4), i32(3), [bt], i32(4), i32(0), i32(-1, -1), [], i32(), i32(), i32()))
      .toThrow(/loraApply: segment 0: dtype code 3 is not 0 \(f32\), 1 \(bf16\) or 2 \(f16\)/);
    // cores: the data's array type must match its dtype code (0 f32, 1 bf16, 2 f16)
    const withCore = (data: Float32Array | Uint16Array, dtype: number): unknown =>
      plan(0, 6, 10, 2, i32(0), i32(2), [a], i32(4), i32(0), [bt], i32(4), i32(0), i32(0, -1), [data], i32(4), i32(1), i32(dtype));
    expect(() => withCore(new Uint16Array(4), 0)).toThrow(/loraApply: core 0: data must be a Float32Array \(dtype f32\)/);
    expect(() => withCore(new Float32Array(4), 1)).toThrow(/loraApply: core 0: data must be a Uint16Array \(dtype bf16 or f16\)/);
    expect(() => withCore(new Uint16Array(4), 3)).toThrow(/loraApply: core 0: dtype code 3 is not 0 \(f32\), 1 \(bf16\) or 2 \(f16\)/);
    expect(() => withCore(new Uint16Array(3), 1)).toThrow(/loraApply: core 0: data has 3 elements, needs 4/);
    const y = new Float32Array(12);
    const x = randomArray(rng, 20);
    apply(0, y, x, handle);
    const want = new Float32Array(12);
    refKernels.loraApply(want, 6, x, 10, [{ start: 0, end: 2, a: weightMatrix('f32', 4, 10, a), bt: weightMatrix('f32', 4, 6, bt) }], []);
    expectClose(y, want, TOLERANCE, 'loraApply through a plan');
  });

  it('rejects mismatched factors, rows beyond the arrays and missing factors with KERNEL errors', () => {
    const rng = new Random(2);
    const a = f32Matrix(rng, 4, 10, 1);
    const t = new Float32Array(3 * 4);
    const x = new Float32Array(3 * 10);
    const expectKernelError = (run: () => void, pattern: RegExp): void => {
      try {
        run();
        expect.fail('accepted bad arguments');
      } catch (e) {
        expect(isSoppuError(e, 'KERNEL')).toBe(true);
        expect((e as Error).message).toMatch(pattern);
      }
    };
    expectKernelError(() => native.loraShrink(t, 4, x, 12, [{ start: 0, end: 1, a }]), /loraShrink: segment 0: a is \[4, 10\], expected .*k 12/);
    expectKernelError(() => native.loraShrink(t, 4, x, 10, [{ start: 2, end: 4, a }]), /loraShrink: t has 12 elements, needs 16/);
    expectKernelError(() => native.loraShrink(t, 3, x, 10, [{ start: 0, end: 1, a }]), /R <= tStride 3/);
    expectKernelError(() => native.loraExpand(t, 10, t, 4, [{ start: 0, end: 1, a }]), /loraExpand: segment 0 has no bt/);
    expectKernelError(() => native.loraCore(t, x, 4, 3, [{ rank: 5, diagonal: true, data: new Float32Array(5) }]), /loraCore: row 0: core rank 5/);
    expectKernelError(() => native.loraCore(t, x, 4, 3, [{ rank: 3, diagonal: false, data: new Float32Array(5) }]), /loraCore: core of row 0 has 5 elements, needs 9/);
    expectKernelError(() => native.loraCore(t, x, 4, 3, [{ rank: 3, diagonal: true, dtype: 'bf16', data: new Float32Array(3) }]),
      /loraCore: row 0: core of dtype bf16 holds a Float32Array/);
    expectKernelError(() => native.loraCore(t, x, 4, 3, [{ rank: 3, diagonal: true, data: new Uint16Array(3) }]),
      /loraCore: row 0: core of dtype f32 holds a Uint16Array/);
  });
});
