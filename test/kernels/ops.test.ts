import { describe, expect, it } from 'vitest';
import { refKernels } from '../../src/kernels/index.js';
import { ropeInvFreq } from '../../src/kernels/ref/index.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { f32ToBf16, f32ToF16 } from '../../src/tensor/dtype.js';
import { weightMatrix } from '../../src/tensor/weight-matrix.js';
import { Random } from '../../src/tensor/random.js';
import { expectClose, nativeSets, offsetCopy, randomArray } from './ops-compare.js';

const TOLERANCE = 2e-5;

it('the addon provides native element-wise ops in every supported variant', () => {
  expect(nativeSets.length).toBeGreaterThan(0);
  for (const set of nativeSets) expect(set.rmsnorm).not.toBe(refKernels.rmsnorm);
});

describe.each(nativeSets.map((set) => [set.name, set] as const))('%s vs ref', (_name, native) => {
  const rng = new Random(41);

  it.each([[1, 1], [3, 7], [2, 33], [2, 576], [2, 896], [1, 2048], [1, 4096]])('rmsnorm rows %i dim %i', (rows, dim) => {
    const x = randomArray(rng, rows * dim, 3);
    const weight = randomArray(rng, dim);
    const want = new Float32Array(rows * dim);
    refKernels.rmsnorm(want, x, weight, rows, dim, 1e-6);
    const out = offsetCopy(new Float32Array(rows * dim));
    native.rmsnorm(out, offsetCopy(x), offsetCopy(weight), rows, dim, 1e-6);
    expectClose(out, want, TOLERANCE, 'rmsnorm');
    const inPlace = offsetCopy(x); // out aliases x
    native.rmsnorm(inPlace, inPlace, weight, rows, dim, 1e-6);
    expectClose(inPlace, want, TOLERANCE, 'rmsnorm in place');
  });

  it.each([[1, 1, 2], [4, 3, 6], [3, 9, 64], [2, 14, 64], [2, 32, 128], [64, 9, 64], [40, 32, 128]])('rope tokens %i heads %i D %i (many tokens: on the pool)', (tokens, heads, headDim) => {
    const x = randomArray(rng, tokens * heads * headDim);
    const positions = Int32Array.from({ length: tokens }, (_, t) => (t === 0 ? 0 : rng.int(8000)));
    const invFreq = ropeInvFreq(headDim, 500000, { ropeType: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    const want = x.slice();
    refKernels.rope(want, positions, tokens, heads, headDim, invFreq);
    const got = offsetCopy(x);
    native.rope(got, offsetCopy(positions), tokens, heads, headDim, offsetCopy(invFreq));
    expectClose(got, want, TOLERANCE, 'rope');
  });

  it('rope keeps its angles between calls per invFreq: the same as the reference across frequency changes, growing positions and positions past its table', () => {
    const heads = 2;
    const cases: [number, number][] = [[64, 10000], [64, 500000], [128, 10000], [64, 10000]]; // [D, theta], the first again last
    for (const [headDim, theta] of cases) {
      const invFreq = ropeInvFreq(headDim, theta);
      // small positions, then larger ones (the table grows), then negative ones and one past any table
      for (const positions of [Int32Array.of(0, 1, 2), Int32Array.of(3, 900, 40000), Int32Array.of(-5, 7, 3_000_000)]) {
        const x = randomArray(rng, positions.length * heads * headDim);
        const want = x.slice();
        refKernels.rope(want, positions, positions.length, heads, headDim, invFreq);
        native.rope(x, positions, positions.length, heads, headDim, invFreq);
        expectClose(x, want, TOLERANCE, `rope D ${headDim} theta ${theta} positions ${Array.from(positions).join(',')}`);
      }
    }
  });

  it.each([[1, 1], [3, 17], [4, 151], [2, 4096]])('softmax rows %i cols %i', (rows, cols) => {
    const x = randomArray(rng, rows * cols, 8);
    for (let c = 1; c < cols; c += 3) x[c] = -Infinity; // masked entries in row 0
    const want = x.slice();
    refKernels.softmax(want, rows, cols);
    const got = offsetCopy(x);
    native.softmax(got, rows, cols);
    expectClose(got, want, TOLERANCE, 'softmax');
  });

  it.each([[1, 1], [3, 17], [4, 151], [2, 4096], [3, 49152]])('logSumExp rows %i cols %i', (rows, cols) => {
    const x = randomArray(rng, rows * cols, 8);
    for (let c = 1; c < cols; c += 3) x[c] = -Infinity; // masked entries
    if (rows > 1) x.fill(-Infinity, (rows - 1) * cols); // a fully masked last row
    const input = x.slice();
    const want = new Float32Array(rows);
    refKernels.logSumExp(want, x, rows, cols);
    const got = offsetCopy(new Float32Array(rows).fill(Number.NaN));
    native.logSumExp(got, offsetCopy(x), rows, cols);
    expect(x).toEqual(input); // read only
    const finiteRows = rows > 1 ? rows - 1 : rows;
    if (rows > 1) expect([got[rows - 1], want[rows - 1]]).toEqual([-Infinity, -Infinity]);
    expectClose(got.subarray(0, finiteRows), want.subarray(0, finiteRows), TOLERANCE, 'logSumExp');
  });

  it.each([[1, 1], [3, 17], [4, 151], [2, 4096], [5, 49152]])('argmax rows %i cols %i', (rows, cols) => {
    const x = randomArray(rng, rows * cols, 8);
    for (let c = 2; c < cols; c += 5) x[c] = -Infinity; // masked entries
    if (rows > 1) x.fill(-Infinity, (rows - 1) * cols); // a fully masked last row: 0
    if (rows > 2) {
      // a tie at the row's maximum, after a NaN that must never be chosen: the lower index wins
      const row = cols;
      const top = Math.max(...x.subarray(row, row + cols)) + 1;
      x[row] = Number.NaN;
      x[row + Math.floor(cols / 3)] = top;
      x[row + cols - 1] = top;
    }
    if (rows > 3) x.fill(7, 2 * cols, 3 * cols); // a constant row: 0
    const input = x.slice();
    const want = new Int32Array(rows);
    refKernels.argmax(want, x, rows, cols);
    const got = offsetCopy(new Int32Array(rows).fill(-5));
    native.argmax(got, offsetCopy(x), rows, cols);
    expect(x).toEqual(input); // read only
    expect(Array.from(got)).toEqual(Array.from(want));
    if (rows > 2) expect(got[1]).toBe(Math.floor(cols / 3));
    if (rows > 1) expect(got[rows - 1]).toBe(0);
  });

  it.each([1, 15, 17, 1000, 3 * 4096 + 5])('siluMul and add n %i', (n) => {
    const gate = randomArray(rng, n, 6);
    gate[0] = 120; // saturated both ways
    if (n > 1) gate[1] = -120;
    const up = randomArray(rng, n);
    const want = new Float32Array(n);
    refKernels.siluMul(want, gate, up, n);
    const got = offsetCopy(new Float32Array(n));
    native.siluMul(got, offsetCopy(gate), offsetCopy(up), n);
    expectClose(got, want, TOLERANCE, 'siluMul');
    const aliased = offsetCopy(gate); // out aliases gate
    native.siluMul(aliased, aliased, up, n);
    expectClose(aliased, want, TOLERANCE, 'siluMul in place');

    const sum = new Float32Array(n);
    refKernels.add(sum, gate, up, n);
    const residual = offsetCopy(gate); // out aliases a
    native.add(residual, residual, offsetCopy(up), n);
    expect(residual).toEqual(sum); // one f32 add: exact
  });

  it.each([[1, 1], [2, 17], [3, 896]])('addBias rows %i cols %i', (rows, cols) => {
    const y = randomArray(rng, rows * cols);
    const bias = randomArray(rng, cols);
    const want = y.slice();
    refKernels.addBias(want, bias, rows, cols);
    const got = offsetCopy(y);
    native.addBias(got, offsetCopy(bias), rows, cols);
    expect(got).toEqual(want);
  });

  it.each([['f32', 1], ['bf16', 17], ['f16', 17], ['f16', 576], ['bf16', 896]] as const)('embedding %s dim %i is exact', (dtype, dim) => {
    const vocab = 50;
    const values = randomArray(rng, vocab * dim, 2);
    const data = dtype === 'f32' ? values : Uint16Array.from(values, (v) => (dtype === 'bf16' ? f32ToBf16(v) : f32ToF16(v)));
    if (dtype === 'f16') data.set([0x0001, 0x83ff, 0x7c00, 0xfc00, 0x0400], 0); // subnormals, ±inf, min normal
    const table = weightMatrix(dtype, vocab, dim, offsetCopy(data));
    const ids = Int32Array.from([0, 49, 7, 7, 23]);
    const want = new Float32Array(ids.length * dim);
    refKernels.embedding(want, table, ids, ids.length);
    const got = offsetCopy(new Float32Array(ids.length * dim));
    native.embedding(got, table, offsetCopy(ids), ids.length);
    expect(got).toEqual(want);
  });

  it('softmax, logSumExp and siluMul agree with the reference on NaN, ±Inf and all −Inf rows, in the vector body and the tail', () => {
    const special = (cols: number, at: number, value: number): Float32Array => {
      const row = randomArray(rng, cols, 3);
      row[at] = value;
      return row;
    };
    const rows: [string, Float32Array][] = [];
    for (const cols of [4, 32, 37]) {
      for (const at of [0, Math.min(5, cols - 1), cols - 1]) {
        rows.push([`NaN at ${at} of ${cols}`, special(cols, at, Number.NaN)], [`+Inf at ${at} of ${cols}`, special(cols, at, Infinity)], [`-Inf at ${at} of ${cols}`, special(cols, at, -Infinity)]);
      }
      rows.push([`all -Inf, ${cols}`, new Float32Array(cols).fill(-Infinity)]);
    }
    const same = (got: Float32Array, want: Float32Array, label: string): void => {
      for (let i = 0; i < want.length; i++) {
        const [g, w] = [got[i]!, want[i]!];
        if (Number.isNaN(w) || !Number.isFinite(w)) expect(Object.is(g, w) || (Number.isNaN(g) && Number.isNaN(w)), `${label} [${i}]: ${g} vs ${w}`).toBe(true);
        else expect(Math.abs(g - w), `${label} [${i}]: ${g} vs ${w}`).toBeLessThanOrEqual(TOLERANCE * Math.max(1, Math.abs(w)));
      }
    };
    for (const [label, row] of rows) {
      const want = row.slice();
      refKernels.softmax(want, 1, row.length);
      const got = offsetCopy(row);
      native.softmax(got, 1, row.length);
      same(got, want, `softmax ${label}`);
      const lseWant = new Float32Array(1);
      refKernels.logSumExp(lseWant, row, 1, row.length);
      const lse = new Float32Array(1);
      native.logSumExp(lse, offsetCopy(row), 1, row.length);
      same(lse, lseWant, `logSumExp ${label}`);
      const up = randomArray(rng, row.length);
      const siluWant = new Float32Array(row.length);
      refKernels.siluMul(siluWant, row, up, row.length);
      const silu = new Float32Array(row.length);
      native.siluMul(silu, offsetCopy(row), offsetCopy(up), row.length);
      same(silu, siluWant, `siluMul ${label}`);
    }
  });

  it('embedding rejects a token id outside the vocabulary and leaves out untouched', () => {
    const table = weightMatrix('f32', 4, 3, randomArray(rng, 12));
    const out = new Float32Array(6).fill(7);
    for (const bad of [4, -1]) {
      let error: unknown;
      try {
        native.embedding(out, table, Int32Array.from([1, bad]), 2);
      } catch (e) {
        error = e;
      }
      expect(isSoppuError(error, 'KERNEL')).toBe(true);
      expect((error as Error).message).toMatch(new RegExp(`token id ${bad} .*vocabulary of 4`));
    }
    expect(out).toEqual(new Float32Array(6).fill(7));
  });

  it('rejects arrays shorter than the sizes given, naming the op', () => {
    const x = new Float32Array(10);
    expect(() => native.rmsnorm(x, x, new Float32Array(4), 3, 4, 1e-6)).toThrow(/rmsnorm: x has 10 elements, needs 12/);
    expect(() => native.rope(x, new Int32Array(1), 1, 2, 5, new Float32Array(3))).toThrow(/rope: headDim 5 must be even/);
    expect(() => native.softmax(x, 2, 6)).toThrow(/softmax/);
    expect(() => native.logSumExp(new Float32Array(1), x, 2, 6)).toThrow(/logSumExp: x has 10 elements, needs 12/);
    expect(() => native.argmax(new Int32Array(1), x, 2, 5)).toThrow(/argmax: out has 1 elements, needs 2/);
    expect(() => native.siluMul(x, x, new Float32Array(3), 10)).toThrow(/siluMul: up has 3 elements, needs 10/);
    expect(() => native.addBias(x, new Float32Array(2), 2, 5)).toThrow(/addBias: bias/);
    try {
      native.add(x, x, x, 11);
      expect.fail('add accepted n beyond the arrays');
    } catch (e) {
      expect(isSoppuError(e, 'KERNEL')).toBe(true);
    }
  });
});
