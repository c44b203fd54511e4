/**
 * Hostile arguments to the native ops give clear errors, never a crash (a crash would take the test worker
 * down): size products that overflow 64 bits, index arrays another thread could rewrite between the addon's
 * check and its use, carried LoRA work that overlaps added work, a plan's factor lists of different lengths,
 * and sizes the TypeScript checks leave to the addon.
 */
import { describe, expect, it } from 'vitest';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import type { KernelSet, LoraSegment } from '../../src/kernels/kernel-set.js';
import { loadNativeAddon } from '../../src/kernels/native-addon.js';
import { nativeSets } from './ops-compare.js';

const f32 = (n: number, value = 0.5): Float32Array => new Float32Array(n).fill(value);
const weights = (rows: number, cols: number) => ({ dtype: 'f32' as const, rows, cols, data: f32(rows * cols) });
const shared = (n: number): Int32Array => new Int32Array(new SharedArrayBuffer(4 * n));

function expectKernelError(run: () => unknown, message: RegExp): void {
  try {
    run();
  } catch (e) {
    expect(isSoppuError(e), String(e)).toBe(true);
    expect((e as { code: string }).code).toBe('KERNEL');
    expect((e as Error).message).toMatch(message);
    return;
  }
  throw new Error(`expected a KERNEL error matching ${message}`);
}

describe.each(nativeSets.map((set) => [set.name, set] as const))('%s with hostile arguments', (_name, kernels: KernelSet) => {
  it('refuses attention sizes whose products overflow (the addon divided by a product wrapped to 0)', () => {
    const small = () => new Int32Array(1);
    expectKernelError(
      () => kernels.attention({
        out: f32(1), q: f32(1), kCache: f32(1), vCache: f32(1), blockTable: small(), blockTableStart: small(), qStart: small(), qLen: small(),
        ctxLen: small(), seqs: 0, heads: 2 ** 21, kvHeads: 2 ** 21, headDim: 2 ** 22, blockSize: 2 ** 21, scale: 1,
      }),
      /beyond exact integers|overflows/,
    );
  });

  it('refuses index arrays in a SharedArrayBuffer', () => {
    expectKernelError(() => kernels.embedding(f32(4), weights(8, 4), shared(1), 1), /ids is backed by a SharedArrayBuffer/);
    expectKernelError(() => kernels.rope(f32(4), shared(1), 1, 1, 4, f32(2)), /positions is backed by a SharedArrayBuffer/);
    const one = Int32Array.of(1);
    expectKernelError(
      () => kernels.attention({
        out: f32(8), q: f32(8), kCache: f32(64), vCache: f32(64), blockTable: shared(1), blockTableStart: new Int32Array(1), qStart: new Int32Array(1),
        qLen: one, ctxLen: one, seqs: 1, heads: 2, kvHeads: 1, headDim: 4, blockSize: 8, scale: 1,
      }),
      /blockTable is backed by a SharedArrayBuffer/,
    );
    expectKernelError(() => kernels.loraRows([], [], shared(2)), /rowOf is backed by a SharedArrayBuffer/);
  });

  it('refuses added LoRA work on rows the carried plan covers (its core would meet another rank)', () => {
    const n = 8, k = 8;
    const segments: LoraSegment[] = [{ start: 0, end: 2, a: weights(5, k), bt: weights(5, n) }];
    const cores = [{ rank: 5, diagonal: false, data: f32(25) }, { rank: 5, diagonal: false, data: f32(25) }];
    kernels.loraApply(f32(2 * n), n, f32(2 * k), k, segments, cores); // the checked plan the carry starts from
    const tiny = { rank: 1, diagonal: false, data: f32(1) };
    const added = { segments: [{ start: 0, end: 2, a: weights(1, k), bt: weights(1, n) }], cores: [tiny, tiny] };
    expectKernelError(() => kernels.loraRows(segments, cores, Int32Array.of(0, 1), added), /added work covers row 0/);
  });

  it('gives matmul size errors as KERNEL errors', () => {
    expectKernelError(() => kernels.matmul(f32(4), f32(4), { dtype: 'f32', rows: Number.NaN, cols: 2, data: f32(4) }, 1), /w.rows=NaN/);
  });
});

describe('the addon called directly', () => {
  const { addon } = loadNativeAddon();
  const direct = addon as unknown as Record<string, (...args: unknown[]) => unknown> | null;

  it.skipIf(!direct)('refuses sizes whose products overflow, and factor lists of different lengths', () => {
    const call = (name: string, ...args: unknown[]) => () => direct![name]!(0, ...args);
    expect(call('rope', f32(16), new Int32Array(2 ** 17), 2 ** 17, 2 ** 30, 2 ** 17, f32(2 ** 16))).toThrow(/overflows 64-bit sizes/);
    expect(call('matmul', f32(16), f32(16), f32(16), 0, 2 ** 32, 2 ** 32, 2 ** 32, false)).toThrow(/below 2\^31/);
    expect(call('gemmF32', false, false, 2 ** 32 + 1, 1, 1, 1, f32(1), 2 ** 32, f32(1), 1, 0, f32(1), 2 ** 32)).toThrow(/below 2\^31/);
    const ints = (...values: number[]) => Int32Array.from(values);
    // loraApplyPlan(isa, n, k, rows, starts, ends, aWeights, aRanks, aDtypes, btWeights, btRanks, btDtypes, coreOfRow, cores, coreRanks, coreDiagonal, coreDtypes)
    expect(call('loraApplyPlan', 8, 8, 2, ints(0, 1), ints(1, 2), [f32(8), f32(8)], ints(1, 1), ints(0, 0), [f32(8)], ints(1, 1), ints(0, 0), ints(-1, -1), [], ints(), ints(), ints()))
      .toThrow(/2 a factors but 1 bt factors/);
    // the addon's own attention check, past the TypeScript one: sizes whose product wraps int64
    const small = new Int32Array(1);
    expect(call('attention', f32(1), f32(1), f32(1), f32(1), small, small, small, small, small, 0, 2 ** 30, 2 ** 30, 2 ** 30, 2 ** 30, 1))
      .toThrow(/overflows 64-bit sizes/);
  });
});
