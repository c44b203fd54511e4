/**
 * Typed views of weights carved one after another out of one shared buffer, each on a cache-line boundary.
 */
import type { WeightDtype } from './dtype.js';
import { WEIGHT_DTYPE_BYTES } from './dtype.js';

/** Where views share a buffer, each starts on a cache line (and so on every element size). */
const VIEW_ALIGN = 64;

/** `bytes` rounded up to where the next view in a shared buffer starts: size a buffer by summing these. */
export function alignedBytes(bytes: number): number {
  return Math.ceil(bytes / VIEW_ALIGN) * VIEW_ALIGN;
}

/**
 * Hands out views of `buffer` in call order, each `elements` values of `dtype` (Float32Array for f32, Uint16Array of
 * bits for bf16/f16) at the next 64-byte boundary; throws a RangeError when the buffer runs out.
 */
export function alignedViews(buffer: ArrayBuffer): (dtype: WeightDtype, elements: number) => Float32Array | Uint16Array {
  let offset = 0;
  return (dtype, elements) => {
    const view = dtype === 'f32' ? new Float32Array(buffer, offset, elements) : new Uint16Array(buffer, offset, elements);
    offset += alignedBytes(elements * WEIGHT_DTYPE_BYTES[dtype]);
    return view;
  };
}
