import { describe, expect, it } from 'vitest';
import { Sampler, resolveSampling } from '../../src/engine/sampler.js';
import type { SamplingParams } from '../../src/engine/engine-types.js';
import { Random } from '../../src/tensor/random.js';

/** Index of the first maximum (NaN ignored). */
function argmaxOf(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

/** The top-k rule written plainly: the k-th largest value (with multiplicity) and every entry >= it is kept. */
function referenceTopK(row: Float32Array, k: number): Float32Array {
  const out = row.slice();
  if (k <= 0 || k >= row.length) return out;
  const sorted = Array.from(row).sort((p, q) => q - p);
  const threshold = sorted[k - 1]!;
  for (let i = 0; i < out.length; i++) if (!(out[i]! >= threshold)) out[i] = -Infinity;
  return out;
}

/** The sampler's draw written plainly: walk ids in order until the cumulative exp(x - max) passes u · total. */
function referenceDraw(row: Float32Array, random: Random): number {
  let max = -Infinity;
  for (const v of row) if (v > max) max = v;
  let total = 0;
  for (const v of row) if (v !== -Infinity) total += Math.exp(v - max);
  const target = random.next() * total;
  let cumulative = 0;
  let last = 0;
  for (let i = 0; i < row.length; i++) {
    if (row[i] === -Infinity) continue;
    cumulative += Math.exp(row[i]! - max);
    last = i;
    if (cumulative > target) return i;
  }
  return last;
}

function expectSameRow(actual: Float32Array, expected: Float32Array): void {
  expect(actual.length).toBe(expected.length);
  let mismatches = 0;
  let first = -1;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      mismatches++;
      if (first < 0) first = i;
    }
  }
  expect({ mismatches, first }).toEqual({ mismatches: 0, first: -1 });
}

function randomRow(seed: number, length: number, quantum = 0): Float32Array {
  const random = new Random(seed);
  return Float32Array.from({ length }, () => {
    const v = random.normal() * 3;
    return quantum > 0 ? Math.round(v / quantum) * quantum : v;
  });
}

describe('Sampler with a tiny temperature', () => {
  const rows: readonly (readonly number[])[] = [
    [0.5, 3, 1, 2, -1],
    [-7, -3.5, -3.25, -100, -3.3],
    [2, 5, 5, -3, 4.999],
    [-1, -1, -1],
    [-Infinity, 1, -Infinity, 0.25],
    [1e30, -1e30, 3e38, -3e38],
    [42],
  ];
  const temperatures = [1e-39, 5e-324, 1e-30, 1e-45];
  const extras: readonly SamplingParams[] = [{}, { topK: 2 }, { topP: 0.9 }, { typicalP: 0.5 }, { topK: 3, topP: 0.5, typicalP: 0.9 }];

  it('picks the argmax with a finite logprob and finite alternatives', () => {
    for (const row of rows) {
      const max = Math.max(...row);
      const ties = row.filter((v) => v === max).length;
      for (const temperature of temperatures) {
        for (const extra of extras) {
          for (let seed = 0; seed < 8; seed++) {
            const sampler = new Sampler(resolveSampling({ temperature, seed, ...extra }), seed);
            const result = sampler.sample(Float32Array.from(row), 3);
            const where = JSON.stringify({ row, temperature, extra, seed, result });
            expect(row[result.id], where).toBe(max);
            if (ties === 1) expect(result.id, where).toBe(argmaxOf(row));
            expect(Number.isFinite(result.logprob), where).toBe(true);
            // the distribution collapses onto the maximum and its ties (some of which a warper may drop)
            if (ties === 1) expect(result.logprob, where).toBe(0);
            else expect(result.logprob, where).toBeGreaterThanOrEqual(-Math.log(ties) - 1e-6);
            expect(result.logprob, where).toBeLessThanOrEqual(1e-6);
            expect(result.alternatives.length, where).toBeGreaterThan(0);
            expect(row[result.alternatives[0]!.id], where).toBe(max);
            for (const alternative of result.alternatives) {
              expect(Number.isFinite(alternative.logprob), where).toBe(true);
              expect(alternative.logprob, where).toBeLessThanOrEqual(0);
            }
          }
        }
      }
    }
  });

  it('keeps picking the argmax over a large vocabulary with top-k', () => {
    const row = randomRow(11, 128_256);
    const best = argmaxOf(row);
    for (const temperature of [1e-39, 5e-324]) {
      const sampler = new Sampler(resolveSampling({ temperature, topK: 24_000, seed: 3 }), 3);
      for (let i = 0; i < 3; i++) {
        const result = sampler.sample(row.slice(), 5);
        expect(result.id).toBe(best);
        expect(result.logprob).toBe(0);
        expect(result.alternatives.map((a) => a.id)).toEqual([best]);
      }
    }
  });

  it('still reports the log-softmax of logits / T for an ordinary temperature', () => {
    const row = [0.5, 3, 1, 2, -1];
    for (const temperature of [0.25, 0.7, 1.5]) {
      const z = Math.log(row.reduce((s, v) => s + Math.exp(v / temperature), 0));
      const sampler = new Sampler(resolveSampling({ temperature, seed: 9 }), 9);
      for (let i = 0; i < 20; i++) {
        const result = sampler.sample(Float32Array.from(row), 5);
        expect(result.logprob).toBeCloseTo(row[result.id]! / temperature - z, 4);
        expect(result.alternatives.map((a) => a.id)).toEqual([1, 3, 2, 0, 4]);
        for (const a of result.alternatives) expect(a.logprob).toBeCloseTo(row[a.id]! / temperature - z, 4);
      }
    }
  });

  it('never reports NaN: a NaN or +Infinity logit falls back to the argmax', () => {
    const cases: readonly [readonly number[], number][] = [
      [[1, Number.NaN, 3, 2], 2],
      [[1, Number.POSITIVE_INFINITY, 3], 1],
      [[-Infinity, -Infinity, -Infinity], 0],
    ];
    for (const [row, expected] of cases) {
      for (const params of [{ doSample: true }, { temperature: 0.5 }, { temperature: 1e-39 }, { temperature: 1e-39, topK: 2 }] as const) {
        const sampler = new Sampler(resolveSampling({ ...params, seed: 1 }), 1);
        const result = sampler.sample(Float32Array.from(row), 3);
        expect(result.id).toBe(expected);
        expect(Number.isNaN(result.logprob)).toBe(false);
        for (const a of result.alternatives) expect(Number.isNaN(a.logprob)).toBe(false);
      }
    }
  });
});

describe('Sampler top-k', () => {
  const vocab = 128_256;

  it('keeps exactly the entries >= the k-th largest value over a 128,256-token vocabulary', () => {
    for (const [seed, quantum] of [[1, 0], [2, 0.25]] as const) {
      const row = randomRow(seed, vocab, quantum);
      for (const k of [1, 50, 64, 65, 24_000, 100_000, vocab - 1, vocab]) {
        const sampler = new Sampler(resolveSampling({ topK: k, seed: 5 }), 5);
        const processed = row.slice();
        const result = sampler.sample(processed);
        const expected = referenceTopK(row, k);
        expectSameRow(processed, expected);
        expect(expected[result.id]).not.toBe(-Infinity);
        const kept = expected.reduce((n, v) => n + (v === -Infinity ? 0 : 1), 0);
        if (quantum === 0) expect(kept).toBe(k); // no ties among these normals
        else expect(kept).toBeGreaterThanOrEqual(k); // ties with the k-th value are kept
      }
    }
  });

  it('keeps ties with the k-th value on both sides of the small-k path', () => {
    const sample = (row: Float32Array, k: number): Float32Array => {
      const processed = row.slice();
      new Sampler(resolveSampling({ topK: k, seed: 1 }), 1).sample(processed);
      return processed;
    };
    expectSameRow(sample(Float32Array.from([1, 3, 3, 3, 2]), 2), Float32Array.from([-Infinity, 3, 3, 3, -Infinity]));
    const wide = Float32Array.from({ length: 200 }, (_, i) => (i % 2 === 0 ? 5 : 1));
    expectSameRow(sample(wide, 70), wide.map((v) => (v === 5 ? 5 : -Infinity)));
    expectSameRow(sample(wide, 150), wide);
    const withMasked = Float32Array.from({ length: 300 }, (_, i) => (i % 3 === 0 ? -Infinity : i % 7));
    for (const k of [10, 64, 65, 150, 199, 200, 201, 299]) expectSameRow(sample(withMasked, k), referenceTopK(withMasked, k));
  });

  it('typical-p keeps every token tied with the last one it keeps (as HF removes only those strictly farther)', () => {
    const processed = Float32Array.from([1, 1, 1, 0, 0, -2]);
    new Sampler(resolveSampling({ typicalP: 0.3, seed: 1 }), 1).sample(processed);
    expectSameRow(processed, Float32Array.from([1, 1, 1, -Infinity, -Infinity, -Infinity]));
  });

  it('matches the plain rule on many random rows with heavy ties', () => {
    const random = new Random(123);
    for (let trial = 0; trial < 300; trial++) {
      const length = 1 + random.int(3000);
      const levels = 1 + random.int(30);
      const row = Float32Array.from({ length }, () => (random.next() < 0.5 ? random.int(levels) - 10 : random.normal()));
      if (trial % 5 === 0) for (let i = 0; i < length; i += 4) row[i] = -Infinity;
      if (trial % 11 === 0) for (let i = 0; i < length; i++) row[i] = -0.5 * (i % 2); // 0, -0.5, 0, ...
      const k = 1 + (trial % 3 === 0 ? random.int(Math.min(length, 80)) : random.int(length));
      const processed = row.slice();
      const result = new Sampler(resolveSampling({ topK: k, seed: trial }), trial).sample(processed);
      const expected = referenceTopK(row, k);
      expectSameRow(processed, expected);
      expect(expected[result.id]).not.toBe(-Infinity);
    }
  });

  it('draws as the plain algorithm does, deterministically, from the kept tokens', () => {
    for (const [length, k, draws] of [[64, 5, 200], [5000, 300, 100], [5000, 1000, 100], [vocab, 24_000, 8]] as const) {
      const row = randomRow(length + k, length);
      const expected = referenceTopK(row, k);
      const reference = new Random(77);
      const want = Array.from({ length: draws }, () => referenceDraw(expected, reference));
      const run = (): number[] => {
        const sampler = new Sampler(resolveSampling({ topK: k, seed: 77 }), 77);
        return Array.from({ length: draws }, () => sampler.sample(row.slice()).id);
      };
      const got = run();
      expect(got).toEqual(want);
      expect(run()).toEqual(got);
      for (const id of got) expect(expected[id]).not.toBe(-Infinity);
      if (draws >= 100) expect(new Set(got).size).toBeGreaterThan(1);
    }
  });
});
