/**
 * The core ops the native addon provides for one ISA variant: matmul, gemmF32, gemmF64.
 * Arguments are validated here, before the native call, so a bad size is a KERNEL SoppuError naming
 * the op and the size, never an out-of-bounds read in C++.
 */
import { SoppuError } from '../errors/soppu-error.js';
import { holdsDtype, type WeightDtype } from '../tensor/dtype.js';
import type { WeightMatrix } from '../tensor/weight-matrix.js';
import type { KernelSet } from './kernel-set.js';
import type { NativeAddon } from './native-addon.js';

/** Weight dtype codes of the addon (native/src/simd-common.h, enum WeightDtype). */
const WEIGHT_DTYPE_CODE: Readonly<Record<WeightDtype, number>> = { f32: 0, bf16: 1, f16: 2 };

type NativeMatmul = (variant: number, y: Float32Array, x: Float32Array, w: Float32Array | Uint16Array,
  dtype: number, m: number, n: number, k: number, accumulate: boolean) => void;
type NativeGemm<T> = (variant: number, transA: boolean, transB: boolean, m: number, n: number, k: number,
  alpha: number, a: T, lda: number, b: T, ldb: number, beta: number, c: T, ldc: number) => void;

function kernelError(op: string, message: string, field: string, limit: number | string): SoppuError {
  return new SoppuError('KERNEL', `${op}: ${message}`, { field, limit });
}

function checkCount(op: string, field: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw kernelError(op, `${field}=${value} must be a non-negative integer`, field, 'integer ≥ 0');
}

function checkLength(op: string, field: string, length: number, needed: number): void {
  if (length < needed) throw kernelError(op, `${field} has ${length} elements, needs ≥ ${needed}`, field, needed);
}

/** Elements a row-major [rows, cols] operand with leading dimension ld spans. */
function extent(rows: number, cols: number, ld: number): number {
  return rows === 0 || cols === 0 ? 0 : (rows - 1) * ld + cols;
}

function checkGemm(op: string, transA: boolean, transB: boolean, m: number, n: number, k: number,
  a: { length: number }, lda: number, b: { length: number }, ldb: number, c: { length: number }, ldc: number): void {
  for (const [field, value] of [['m', m], ['n', n], ['k', k], ['lda', lda], ['ldb', ldb], ['ldc', ldc]] as const) checkCount(op, field, value);
  const aRows = transA ? k : m, aCols = transA ? m : k;
  const bRows = transB ? n : k, bCols = transB ? k : n;
  if (lda < aCols) throw kernelError(op, `lda=${lda} < ${aCols} (columns of A${transA ? ' stored [k,m]' : ''})`, 'lda', aCols);
  if (ldb < bCols) throw kernelError(op, `ldb=${ldb} < ${bCols} (columns of B${transB ? ' stored [n,k]' : ''})`, 'ldb', bCols);
  if (ldc < n) throw kernelError(op, `ldc=${ldc} < n=${n}`, 'ldc', n);
  checkLength(op, 'a', a.length, extent(aRows, aCols, lda));
  checkLength(op, 'b', b.length, extent(bRows, bCols, ldb));
  checkLength(op, 'c', c.length, extent(m, n, ldc));
}

/** Runs a native call, turning the addon's own argument errors into SoppuError('KERNEL') naming the op. */
export function guarded<T>(op: string, run: () => T): T {
  try {
    return run();
  } catch (e) {
    if (e instanceof Error && !(e instanceof SoppuError)) throw new SoppuError('KERNEL', `${op}: ${e.message}`, { field: op, cause: e.message });
    throw e;
  }
}

/** matmul/gemmF32/gemmF64 of the addon bound to one variant; ops the addon lacks are left out. */
export function nativeCoreOps(addon: NativeAddon, variantIndex: number): Partial<KernelSet> {
  const ops: Partial<KernelSet> = {};
  const matmul = addon.matmul as NativeMatmul | undefined;
  if (typeof matmul === 'function') {
    ops.matmul = (y: Float32Array, x: Float32Array, w: WeightMatrix, m: number, accumulate = false): void => {
      checkCount('matmul', 'm', m);
      const n = w.rows, k = w.cols;
      checkCount('matmul', 'w.rows', n);
      checkCount('matmul', 'w.cols', k);
      // y: [M, N]; x: [M, K]; W: [N, K]
      checkLength('matmul', 'y', y.length, m * n);
      checkLength('matmul', 'x', x.length, m * k);
      checkLength('matmul', `w (${w.dtype} [${n}, ${k}])`, w.data.length, n * k);
      if (!holdsDtype(w.dtype, w.data)) {
        throw kernelError('matmul', `weight dtype ${w.dtype} does not match its ${w.data.constructor.name} data`, 'w.dtype', w.dtype);
      }
      guarded('matmul', () => matmul(variantIndex, y, x, w.data, WEIGHT_DTYPE_CODE[w.dtype], m, n, k, accumulate));
    };
  }
  const gemmF32 = addon.gemmF32 as NativeGemm<Float32Array> | undefined;
  if (typeof gemmF32 === 'function') {
    ops.gemmF32 = (transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): void => {
      checkGemm('gemmF32', transA, transB, m, n, k, a, lda, b, ldb, c, ldc);
      guarded('gemmF32', () => gemmF32(variantIndex, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
    };
  }
  const gemmF64 = addon.gemmF64 as NativeGemm<Float64Array> | undefined;
  if (typeof gemmF64 === 'function') {
    ops.gemmF64 = (transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): void => {
      checkGemm('gemmF64', transA, transB, m, n, k, a, lda, b, ldb, c, ldc);
      guarded('gemmF64', () => gemmF64(variantIndex, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
    };
  }
  return ops;
}
