/**
 * Shared helpers for the differential tests of the native non-matmul ops (ops, attention, lora):
 * every supported native variant against refKernels on one case list.
 */
import { expect } from 'vitest';
import { supportedNativeKernelSets } from '../../src/kernels/index.js';
import type { KernelSet } from '../../src/kernels/kernel-set.js';
import { Random } from '../../src/tensor/random.js';

/** Native variants this CPU supports (scalar at least, when the addon is built). */
export const nativeSets: KernelSet[] = supportedNativeKernelSets();

export function randomArray(rng: Random, n: number, std = 1): Float32Array {
  return rng.fillNormal(new Float32Array(n), std);
}

/**
 * A copy of `source` living at a nonzero byteOffset inside a larger buffer (guards included),
 * so ops are exercised on subarrays as the engine passes them.
 */
export function offsetCopy<T extends Float32Array | Int32Array | Uint16Array>(source: T, lead = 3): T {
  const Constructor = source.constructor as new (n: number) => T;
  const backing = new Constructor(source.length + lead + 5);
  const view = backing.subarray(lead, lead + source.length) as T;
  view.set(source as never);
  return view;
}

/** max |actual − expected| ≤ tolerance · max(1, max |expected|), with the first offender named. */
export function expectClose(actual: Float32Array, expected: Float32Array, tolerance: number, label: string): void {
  expect(actual.length, `${label}: length`).toBe(expected.length);
  let scale = 1;
  for (const v of expected) if (Number.isFinite(v)) scale = Math.max(scale, Math.abs(v));
  let worst = 0;
  let worstIndex = -1;
  for (let i = 0; i < expected.length; i++) {
    const e = expected[i]!;
    const a = actual[i]!;
    const error = Number.isNaN(e) && Number.isNaN(a) ? 0 : Math.abs(a - e);
    if (!(error <= worst)) {
      worst = error;
      worstIndex = i;
    }
  }
  const limit = tolerance * scale;
  if (!(worst <= limit)) {
    expect.fail(`${label}: |error| ${worst} at ${worstIndex} (got ${actual[worstIndex]}, want ${expected[worstIndex]}) > ${limit}`);
  }
}

/** Bit-identical rows [start, end) of width `width` (rows an op must not touch). */
export function expectRowsUntouched(actual: Float32Array, original: Float32Array, width: number, rows: Iterable<number>,
  label: string): void {
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const o = new Uint32Array(original.buffer, original.byteOffset, original.length);
  for (const r of rows) {
    for (let c = 0; c < width; c++) {
      if (a[r * width + c] !== o[r * width + c]) expect.fail(`${label}: row ${r} col ${c} was touched`);
    }
  }
}
