/**
 * Tensor dtypes and element conversion (bf16/f16 ↔ f32). No math beyond conversion lives here.
 */

/** safetensors dtype names we read and write. */
export type StDtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

/** Storage dtype of a weight matrix fed to the matmul kernels. */
export type WeightDtype = 'f32' | 'bf16' | 'f16';

/** Bytes per element of each safetensors dtype. */
export const ST_DTYPE_BYTES: Readonly<Record<StDtype, number>> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1,
};

/** Bytes per element of each weight dtype. */
export const WEIGHT_DTYPE_BYTES: Readonly<Record<WeightDtype, number>> = { f32: 4, bf16: 2, f16: 2 };

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** f32 → bf16 bits, round to nearest even (NaN stays NaN). */
export function f32ToBf16(value: number): number {
  f32Scratch[0] = value;
  const bits = u32Scratch[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x0040) & 0xffff;
  const rounding = 0x7fff + ((bits >>> 16) & 1);
  return ((bits + rounding) >>> 16) & 0xffff;
}

/** bf16 bits → f32. */
export function bf16ToF32(bits: number): number {
  u32Scratch[0] = (bits & 0xffff) << 16;
  return f32Scratch[0]!;
}

/** f16 bits → f32 (handles subnormals, inf, NaN). */
export function f16ToF32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** One stored element as f32: an f32 value as is, bf16/f16 raw bits widened. */
export function storedToF32(dtype: WeightDtype, value: number): number {
  return dtype === 'f32' ? value : dtype === 'bf16' ? bf16ToF32(value) : f16ToF32(value);
}

/**
 * True when `data` is the array a dtype's elements are stored in: a Float32Array for f32, a Uint16Array of
 * raw bits for bf16 and f16 (weights, adapter factors and cores alike).
 */
export function holdsDtype(dtype: WeightDtype, data: ArrayBufferView): boolean {
  return dtype === 'f32' ? data instanceof Float32Array : data instanceof Uint16Array;
}

/** f32 → f16 bits, round to nearest even; overflow goes to ±inf. */
export function f32ToF16(value: number): number {
  f32Scratch[0] = value;
  const bits = u32Scratch[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  let mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0);
  const halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00;
  if (halfExponent <= 0) {
    if (halfExponent < -10) return sign;
    mantissa |= 0x800000;
    const shift = 14 - halfExponent;
    let half = mantissa >>> shift;
    const remainder = mantissa & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (remainder > halfway || (remainder === halfway && (half & 1))) half++;
    return sign | half;
  }
  let half = (halfExponent << 10) | (mantissa >>> 13);
  const remainder = mantissa & 0x1fff;
  if (remainder > 0x1000 || (remainder === 0x1000 && (half & 1))) half++;
  return sign | half;
}

/** Widen a bf16 array to f32 (used for small tensors only: adapters, norms, reports). */
export function bf16ArrayToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  const dstBits = new Uint32Array(dst.buffer, dst.byteOffset, dst.length);
  for (let i = 0; i < src.length; i++) dstBits[i] = src[i]! << 16;
  return dst;
}

/** Widen an f16 array to f32. */
export function f16ArrayToF32(src: Uint16Array, dst: Float32Array = new Float32Array(src.length)): Float32Array {
  for (let i = 0; i < src.length; i++) dst[i] = f16ToF32(src[i]!);
  return dst;
}

/** Narrow an f32 array to bf16 bits (round to nearest even). */
export function f32ArrayToBf16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  for (let i = 0; i < src.length; i++) dst[i] = f32ToBf16(src[i]!);
  return dst;
}

/** Largest finite f16 magnitude. */
export const F16_MAX = 65504;

/**
 * `data` narrowed to `dtype` bits, or the index of the first value that would not stay finite there: f16
 * refuses magnitudes beyond 65504; bf16 only values within half an ulp of the f32 maximum, which round to ±∞.
 * The bits go to `dst` when given (its length must be data's).
 */
export function narrowFinite(data: Float32Array, dtype: 'bf16' | 'f16', dst?: Uint16Array): { bits: Uint16Array } | { overflowAt: number } {
  const bits = dtype === 'f16' ? f32ArrayToF16(data, dst) : f32ArrayToBf16(data, dst);
  // a finite value that rounds to ±Infinity (f16 from 65520 on: 65504 < |x| < 65520 round to 65504)
  const infinity = dtype === 'f16' ? 0x7c00 : 0x7f80;
  for (let i = 0; i < bits.length; i++) if ((bits[i]! & 0x7fff) === infinity && Number.isFinite(data[i]!)) return { overflowAt: i };
  return { bits };
}

/** Narrow an f32 array to f16 bits. */
export function f32ArrayToF16(src: Float32Array, dst: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  for (let i = 0; i < src.length; i++) dst[i] = f32ToF16(src[i]!);
  return dst;
}
