import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { refKernels, supportedNativeKernelSets } from '../../src/kernels/index.js';
import { Random } from '../../src/tensor/random.js';
import { weightMatrix } from '../../src/tensor/weight-matrix.js';

const variants = supportedNativeKernelSets();
const addonPath = join(process.cwd(), 'build', 'Release', 'soppu_native.node');

describe.skipIf(variants.length === 0)('native thread pool', () => {
  it('SOPPU_THREADS sets the pool size, and odd thread counts split matmul and matmulGroup correctly', () => {
    // A fresh process per thread count: the pool is sized once, at first use.
    const script = `
      const addon = require(${JSON.stringify(addonPath)});
      const m = 5, n = 301, k = 97;
      const x = new Float32Array(m * k), w = new Float32Array(n * k), y = new Float32Array(m * n);
      for (let i = 0; i < x.length; i++) x[i] = ((i * 37) % 19) / 19 - 0.5;
      for (let i = 0; i < w.length; i++) w[i] = ((i * 53) % 23) / 23 - 0.5;
      // a group of two: w's rows [0, 40) and [40, n) as parts, each thread's share crossing between them
      const y0 = new Float32Array(m * 40), y1 = new Float32Array(m * (n - 40));
      const w0 = w.subarray(0, 40 * k), w1 = w.subarray(40 * k);
      let worst = 0;
      for (let repeat = 0; repeat < 50; repeat++) {
        addon.matmul(addon.bestVariant(), y, x, w, 0, m, n, k, false);
        addon.matmulGroup(addon.bestVariant(), x, m, k, [y0, w0, 0, 40, undefined, y1, w1, 0, n - 40, undefined]);
        for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
          let s = 0;
          for (let c = 0; c < k; c++) s += x[i * k + c] * w[j * k + c];
          const grouped = j < 40 ? y0[i * 40 + j] : y1[i * (n - 40) + j - 40];
          worst = Math.max(worst, Math.abs(s - y[i * n + j]), Math.abs(s - grouped));
        }
      }
      process.stdout.write(JSON.stringify({ threads: addon.numThreads(), worst }));`;
    for (const threads of [1, 3]) {
      const output = execFileSync(process.execPath, ['-e', script], { env: { ...process.env, SOPPU_THREADS: String(threads) }, encoding: 'utf8' });
      const result = JSON.parse(output) as { threads: number; worst: number };
      expect(result.threads).toBe(threads);
      expect(result.worst).toBeLessThan(1e-4);
    }
  });

  it('back-to-back parallel calls of many sizes never race (results match a serial reference)', () => {
    const random = new Random(77);
    for (const kernels of variants) {
      for (let trial = 0; trial < 40; trial++) {
        const m = 1 + random.int(6), n = 100 + random.int(500), k = 64 + random.int(200);
        const w = weightMatrix('f32', n, k, random.fillNormal(new Float32Array(n * k)));
        const x = random.fillNormal(new Float32Array(m * k));
        const expected = new Float32Array(m * n);
        const actual = new Float32Array(m * n);
        refKernels.matmul(expected, x, w, m);
        kernels.matmul(actual, x, w, m);
        let worst = 0;
        for (let i = 0; i < expected.length; i++) worst = Math.max(worst, Math.abs(actual[i]! - expected[i]!) / (1 + Math.abs(expected[i]!)));
        expect(worst, `${kernels.name} m=${m} n=${n} k=${k}`).toBeLessThan(2e-4);
      }
    }
  });
});
