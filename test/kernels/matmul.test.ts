import { describe, expect, it } from 'vitest';
import { refKernels, supportedNativeKernelSets, type KernelSet } from '../../src/kernels/index.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { f32ArrayToBf16, f32ArrayToF16, type WeightDtype } from '../../src/tensor/dtype.js';
import { Random } from '../../src/tensor/random.js';
import { weightMatrix, type WeightMatrix } from '../../src/tensor/weight-matrix.js';

const variants = supportedNativeKernelSets();

function makeWeight(random: Random, dtype: WeightDtype, n: number, k: number): WeightMatrix {
  const values = random.fillNormal(new Float32Array(n * k), 0.5);
  if (dtype === 'f32') return weightMatrix('f32', n, k, values);
  return weightMatrix(dtype, n, k, dtype === 'bf16' ? f32ArrayToBf16(values) : f32ArrayToF16(values));
}

/** |a − b| ≤ tol·(1 + |ref|) with tol growing with √K (accumulation order differs). */
function expectClose(actual: Float32Array, expected: Float32Array, k: number, label: string): void {
  const tolerance = 1e-5 * (4 + Math.sqrt(k));
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    const error = Math.abs(actual[i]! - expected[i]!) / (1 + Math.abs(expected[i]!));
    if (!(error <= worst)) worst = error; // NaN propagates
  }
  expect(worst, label).toBeLessThanOrEqual(tolerance);
}

interface Case { m: number; n: number; k: number }

// Odd shapes, then subsets of real-model shapes (hidden 576, 896, 2048, 4096; FFN 1536, 4864).
const oddShapes: Case[] = [];
for (const m of [1, 3, 17]) for (const k of [1, 7, 33, 65]) for (const n of [1, 7, 33, 65]) oddShapes.push({ m, n, k });
const modelShapes: Case[] = [
  { m: 1, n: 37, k: 576 }, { m: 5, n: 29, k: 576 }, { m: 2, n: 25, k: 1536 },
  { m: 3, n: 31, k: 896 }, { m: 1, n: 19, k: 4864 }, { m: 9, n: 13, k: 2048 },
  { m: 1, n: 26, k: 4096 }, { m: 4, n: 7, k: 4096 }, { m: 70, n: 11, k: 576 },
  // K in two slices for more than four f32 rows (down_proj: two of 768; k 1100: 560 + 540)
  { m: 33, n: 31, k: 1536 }, { m: 6, n: 17, k: 1100 },
  // one row of x: W rows in address order, except f32 rows over 8 KiB (k 2048 on one side, 2056 on the other)
  { m: 1, n: 21, k: 2048 }, { m: 1, n: 9, k: 2056 },
];

describe.skipIf(variants.length === 0)('native matmul vs ref', () => {
  it('has the native ops wired in every variant', () => {
    for (const kernels of variants) expect(kernels.matmul).not.toBe(refKernels.matmul);
  });

  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    it(`${dtype}: odd and model shapes, accumulate on/off, every variant`, () => {
      const random = new Random(1234);
      for (const { m, n, k } of [...oddShapes, ...modelShapes]) {
        const w = makeWeight(random, dtype, n, k);
        const x = random.fillNormal(new Float32Array(m * k));
        const base = random.fillNormal(new Float32Array(m * n));
        for (const accumulate of [false, true]) {
          const expected = base.slice();
          refKernels.matmul(expected, x, w, m, accumulate);
          for (const kernels of variants) {
            const actual = base.slice();
            kernels.matmul(actual, x, w, m, accumulate);
            expectClose(actual, expected, k, `${kernels.name} ${dtype} m=${m} n=${n} k=${k} acc=${accumulate}`);
          }
        }
      }
    });
  }

  it('honours byteOffset of subarray inputs and writes only [M, N] of y', () => {
    const random = new Random(99);
    const m = 3, n = 17, k = 33;
    for (const dtype of ['f32', 'bf16', 'f16'] as const) {
      const full = makeWeight(random, dtype, n + 2, k);
      // W starts one row in: a subarray whose byteOffset is not 64-byte aligned
      const data = full.data.subarray(k, k + n * k);
      const w = dtype === 'f32' ? weightMatrix('f32', n, k, data as Float32Array) : weightMatrix(dtype, n, k, data as Uint16Array);
      const xBuffer = random.fillNormal(new Float32Array(m * k + 5));
      const x = xBuffer.subarray(5);
      const expected = new Float32Array(m * n);
      refKernels.matmul(expected, x, w, m);
      for (const kernels of variants) {
        const yBuffer = new Float32Array(m * n + 3 + 4).fill(7);
        const y = yBuffer.subarray(3, 3 + m * n);
        kernels.matmul(y, x, w, m);
        expectClose(y, expected, k, `${kernels.name} ${dtype} subarray`);
        expect([...yBuffer.subarray(0, 3), ...yBuffer.subarray(3 + m * n)]).toEqual([7, 7, 7, 7, 7, 7, 7]);
      }
    }
  });

  it('converts bf16/f16 specials (subnormal f16, inf) like the reference', () => {
    const k = 20, n = 2;
    // f16 bits: 1 (smallest subnormal), 0x03ff (largest subnormal), 0x7bff (max), 0x3c00 (1.0)
    const f16 = new Uint16Array(n * k);
    for (let i = 0; i < f16.length; i++) f16[i] = [0x0001, 0x03ff, 0x7bff, 0x3c00, 0xbc00][i % 5]!;
    const x = new Float32Array(k).fill(1);
    const expected = new Float32Array(n);
    refKernels.matmul(expected, x, weightMatrix('f16', n, k, f16), 1);
    for (const kernels of variants) {
      const y = new Float32Array(n);
      kernels.matmul(y, x, weightMatrix('f16', n, k, f16), 1);
      expectClose(y, expected, k, `${kernels.name} f16 specials`);
    }
  });

  it('m = 0 and k = 0 are well defined', () => {
    for (const kernels of variants) {
      const y = new Float32Array(6).fill(3);
      kernels.matmul(y, new Float32Array(0), weightMatrix('f32', 3, 0, new Float32Array(0)), 2);
      expect([...y]).toEqual([0, 0, 0, 0, 0, 0]);
      kernels.matmul(y, new Float32Array(0), weightMatrix('f32', 3, 0, new Float32Array(0)), 0);
      expect([...y]).toEqual([0, 0, 0, 0, 0, 0]);
    }
  });

  it('rejects short arrays and bad sizes with a KERNEL error, never a crash', () => {
    const w = weightMatrix('f32', 4, 8, new Float32Array(32));
    for (const kernels of variants) {
      const expectKernelError = (f: () => void, text: RegExp): void => {
        let caught: unknown;
        try { f(); } catch (e) { caught = e; }
        expect(isSoppuError(caught, 'KERNEL'), String(caught)).toBe(true);
        expect((caught as Error).message).toMatch(text);
      };
      expectKernelError(() => kernels.matmul(new Float32Array(7), new Float32Array(16), w, 2), /matmul: y has 7 elements, needs ≥ 8/);
      expectKernelError(() => kernels.matmul(new Float32Array(8), new Float32Array(15), w, 2), /matmul: x has 15/);
      expectKernelError(() => kernels.matmul(new Float32Array(8), new Float32Array(16), w, 1.5), /m=1.5/);
      const lying = { dtype: 'bf16', rows: 4, cols: 8, data: new Float32Array(32) } as unknown as WeightMatrix;
      expectKernelError(() => kernels.matmul(new Float32Array(8), new Float32Array(16), lying, 2), /dtype bf16/);
      const short = { dtype: 'f32', rows: 4, cols: 8, data: new Float32Array(31) } as unknown as WeightMatrix;
      expectKernelError(() => kernels.matmul(new Float32Array(8), new Float32Array(16), short, 2), /matmul: w/);
    }
  });

  it('is deterministic across repeated calls (parallel split does not change results)', () => {
    const random = new Random(5);
    const m = 33, n = 200, k = 600;
    const w = makeWeight(random, 'bf16', n, k);
    const x = random.fillNormal(new Float32Array(m * k));
    for (const kernels of variants as KernelSet[]) {
      const first = new Float32Array(m * n);
      const second = new Float32Array(m * n);
      kernels.matmul(first, x, w, m);
      kernels.matmul(second, x, w, m);
      expect(second).toEqual(first);
    }
  });
});
