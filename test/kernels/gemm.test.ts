import { describe, expect, it } from 'vitest';
import { refKernels, supportedNativeKernelSets } from '../../src/kernels/index.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { Random } from '../../src/tensor/random.js';

const variants = supportedNativeKernelSets();

interface Case { m: number; n: number; k: number }

// Odd shapes, block-edge shapes, and the compression shapes ([4096, 16]ᵀ·[4096, 16], U·Σ·Vᵀ pieces).
const cases: Case[] = [
  { m: 1, n: 1, k: 1 }, { m: 3, n: 7, k: 5 }, { m: 17, n: 33, k: 65 }, { m: 9, n: 1, k: 129 },
  { m: 1, n: 65, k: 7 }, { m: 130, n: 37, k: 300 }, { m: 16, n: 16, k: 4096 }, { m: 64, n: 16, k: 896 },
  { m: 16, n: 576, k: 16 },
];

type Floats = Float32Array | Float64Array;

function expectClose(actual: Floats, expected: Floats, k: number, tolerance: number, label: string): void {
  const limit = tolerance * (4 + Math.sqrt(k));
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    const error = Math.abs(actual[i]! - expected[i]!) / (1 + Math.abs(expected[i]!));
    if (!(error <= worst)) worst = error;
  }
  expect(worst, label).toBeLessThanOrEqual(limit);
}

for (const precision of ['f32', 'f64'] as const) {
  const make = (n: number): Floats => (precision === 'f32' ? new Float32Array(n) : new Float64Array(n));
  const tolerance = precision === 'f32' ? 1e-5 : 1e-13;
  const op = precision === 'f32' ? 'gemmF32' : 'gemmF64';

  describe.skipIf(variants.length === 0)(`native ${op} vs ref`, () => {
    it('is wired in every variant', () => {
      for (const kernels of variants) expect(kernels[op]).not.toBe(refKernels[op]);
    });

    it('all transpose combos, padded leading dims, alpha/beta, subarrays', () => {
      const random = new Random(precision === 'f32' ? 11 : 12);
      for (const { m, n, k } of cases) {
        for (const transA of [false, true]) for (const transB of [false, true]) {
          const pad = (m + n + k) % 3; // vary the leading-dimension padding
          const lda = (transA ? m : k) + pad, ldb = (transB ? k : n) + pad, ldc = n + pad;
          const aRows = transA ? k : m, bRows = transB ? n : k;
          // operands are subarrays at an odd element offset
          const a = random.fillNormal(make(aRows * lda + 3)).subarray(3);
          const b = random.fillNormal(make(bRows * ldb + 1)).subarray(1);
          const c0 = random.fillNormal(make(m * ldc + 2)).subarray(2);
          for (const [alpha, beta] of [[1, 0], [0.5, 1], [-2, 0.25]] as const) {
            const expected = c0.slice();
            refKernels[op](transA, transB, m, n, k, alpha, a as never, lda, b as never, ldb, beta, expected as never, ldc);
            for (const kernels of variants) {
              const actual = c0.slice();
              kernels[op](transA, transB, m, n, k, alpha, a as never, lda, b as never, ldb, beta, actual as never, ldc);
              expectClose(actual, expected, k, tolerance,
                `${kernels.name} ${op} tA=${transA} tB=${transB} m=${m} n=${n} k=${k} α=${alpha} β=${beta}`);
            }
          }
        }
      }
    });

    it('beta = 0 does not read C (NaN stays out); padding columns of C are untouched', () => {
      const random = new Random(3);
      const m = 5, n = 9, k = 20, ldc = 12;
      const a = random.fillNormal(make(m * k));
      const b = random.fillNormal(make(k * n));
      for (const kernels of variants) {
        const c = make(m * ldc).fill(NaN);
        kernels[op](false, false, m, n, k, 1, a as never, k, b as never, n, 0, c as never, ldc);
        for (let i = 0; i < m; i++) {
          for (let j = 0; j < ldc; j++) expect(Number.isNaN(c[i * ldc + j]!), `${kernels.name} [${i},${j}]`).toBe(j >= n);
        }
        const empty = make(m * n).fill(NaN);
        kernels[op](false, false, m, n, 0, 1, make(0) as never, 0, make(0) as never, n, 0, empty as never, n);
        expect([...empty].every((v) => v === 0), `${kernels.name} k=0`).toBe(true);
      }
    });

    it('rejects bad leading dimensions and short arrays with a KERNEL error', () => {
      for (const kernels of variants) {
        const attempt = (f: () => void, text: RegExp): void => {
          let caught: unknown;
          try { f(); } catch (e) { caught = e; }
          expect(isSoppuError(caught, 'KERNEL'), String(caught)).toBe(true);
          expect((caught as Error).message).toMatch(text);
        };
        const a = make(12), b = make(12), c = make(9);
        attempt(() => kernels[op](false, false, 3, 3, 4, 1, a as never, 3, b as never, 3, 0, c as never, 3), /lda=3 < 4/);
        attempt(() => kernels[op](true, false, 3, 3, 4, 1, a as never, 3, b as never, 2, 0, c as never, 3), /ldb=2 < 3/);
        attempt(() => kernels[op](false, false, 3, 3, 4, 1, a as never, 4, b as never, 3, 0, make(8) as never, 3), /c has 8 elements, needs ≥ 9/);
        attempt(() => kernels[op](false, true, 3, 3, 5, 1, a as never, 5, b as never, 5, 0, c as never, 3), /a has 12 elements/);
        attempt(() => kernels[op](false, false, -1, 3, 4, 1, a as never, 4, b as never, 3, 0, c as never, 3), /m=-1/);
      }
    });
  });
}
