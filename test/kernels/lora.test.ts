import { describe, expect, it } from 'vitest';
import { refKernels } from '../../src/kernels/index.js';
import type { LoraCore, LoraSegment } from '../../src/kernels/kernel-set.js';
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

function f32Matrix(rng: Random, rows: number, cols: number, std: number): WeightMatrix {
  return weightMatrix('f32', rows, cols, offsetCopy(randomArray(rng, rows * cols, std)));
}

it('the addon provides native LoRA segment ops in every supported variant', () => {
  expect(nativeSets.length).toBeGreaterThan(0);
  for (const set of nativeSets) {
    expect(set.loraShrink).not.toBe(refKernels.loraShrink);
    expect(set.loraExpand).not.toBe(refKernels.loraExpand);
    expect(set.loraCore).not.toBe(refKernels.loraCore);
  }
});

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

  it.each(['bf16', 'f16'] as const)('%s factors (widened per tile) match the reference', (dtype) => {
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

  it.each([1, 7, 16, 64, 256])('core rank %i: full and diagonal per row, null rows untouched', (rank) => {
    const rng = new Random(rank);
    const stride = rank + 2;
    const rows = 7;
    const full: LoraCore = { rank, diagonal: false, data: offsetCopy(randomArray(rng, rank * rank, 0.5)) };
    const diagonal: LoraCore = { rank, diagonal: true, data: offsetCopy(randomArray(rng, rank, 2)) };
    const smaller: LoraCore = { rank: Math.max(1, rank - 3), diagonal: false, data: randomArray(rng, Math.max(1, rank - 3) ** 2) };
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
  });
});
