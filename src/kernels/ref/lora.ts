import { MAX_MATMUL_GROUP, type KernelSet, type LoraCore, type LoraRows, type LoraSegment } from '../kernel-set.js';
import { holdsDtype, storedToF32 } from '../../tensor/dtype.js';
import { weightAt, type WeightMatrix } from '../../tensor/weight-matrix.js';
import { matmul } from './matmul.js';

/** Element i of a core as f32 (16-bit cores hold raw bits). */
function coreAt(core: LoraCore, i: number): number {
  return storedToF32(core.dtype ?? 'f32', core.data[i]!);
}

/** Throws when a core's data array does not match its dtype. */
function checkCore(op: string, core: LoraCore): void {
  if (!holdsDtype(core.dtype ?? 'f32', core.data)) {
    throw new TypeError(`${op}: core of dtype ${core.dtype ?? 'f32'} holds a ${core.data.constructor.name}`);
  }
}

// t: [M, tStride]; x: [M, k]; segment.a: [R, k]
export function loraShrink(t: Float32Array, tStride: number, x: Float32Array, k: number, segments: readonly LoraSegment[]): void {
  for (const segment of segments) {
    const a = segment.a;
    if (!a) throw new TypeError('loraShrink: segment without a');
    for (let r = segment.start; r < segment.end; r++) {
      for (let j = 0; j < a.rows; j++) {
        let sum = 0;
        for (let c = 0; c < k; c++) sum += x[r * k + c]! * weightAt(a, j, c);
        t[r * tStride + j] = sum;
      }
    }
  }
}

// y: [M, n]; t: [M, tStride]; segment.bt: [R, n]
export function loraExpand(y: Float32Array, n: number, t: Float32Array, tStride: number, segments: readonly LoraSegment[]): void {
  for (const segment of segments) {
    const bt = segment.bt;
    if (!bt) throw new TypeError('loraExpand: segment without bt');
    for (let r = segment.start; r < segment.end; r++) {
      for (let o = 0; o < n; o++) {
        let sum = 0;
        for (let j = 0; j < bt.rows; j++) sum += t[r * tStride + j]! * weightAt(bt, j, o);
        y[r * n + o] = y[r * n + o]! + sum;
      }
    }
  }
}

// out, t: [M, stride]
export function loraCore(out: Float32Array, t: Float32Array, stride: number, rows: number, cores: readonly (LoraCore | null | undefined)[]): void {
  for (let r = 0; r < rows; r++) {
    const core = cores[r];
    if (!core) continue;
    checkCore('loraCore', core);
    const base = r * stride;
    for (let i = 0; i < core.rank; i++) {
      if (core.diagonal) {
        out[base + i] = coreAt(core, i) * t[base + i]!;
        continue;
      }
      let sum = 0;
      for (let j = 0; j < core.rank; j++) sum += coreAt(core, i * core.rank + j) * t[base + j]!;
      out[base + i] = sum;
    }
  }
}

// y: [M, n]; x: [M, k]; segment.a: [R, k]; segment.bt: [R, n]; cores[r]: [R, R] or [R]
export function loraApply(y: Float32Array, n: number, x: Float32Array, k: number, segments: readonly LoraSegment[],
  cores: readonly (LoraCore | null | undefined)[]): void {
  for (const segment of segments) {
    const { a, bt } = segment;
    if (!a || !bt) throw new TypeError('loraApply: segment without a or bt');
    if (a.rows !== bt.rows) throw new TypeError(`loraApply: a has rank ${a.rows}, bt has rank ${bt.rows}`);
    const rank = a.rows;
    for (let r = segment.start; r < segment.end; r++) {
      const t = new Float64Array(rank);
      for (let j = 0; j < rank; j++) {
        let sum = 0;
        for (let c = 0; c < k; c++) sum += x[r * k + c]! * weightAt(a, j, c);
        t[j] = sum;
      }
      const core = cores[r];
      let u = t;
      if (core) {
        if (core.rank !== rank) throw new TypeError(`loraApply: row ${r} has a core of rank ${core.rank}, its segment rank ${rank}`);
        checkCore('loraApply', core);
        u = new Float64Array(rank);
        for (let i = 0; i < rank; i++) {
          if (core.diagonal) {
            u[i] = coreAt(core, i) * t[i]!;
            continue;
          }
          let sum = 0;
          for (let j = 0; j < rank; j++) sum += coreAt(core, i * rank + j) * t[j]!;
          u[i] = sum;
        }
      }
      for (let o = 0; o < n; o++) {
        let sum = 0;
        for (let j = 0; j < rank; j++) sum += u[j]! * weightAt(bt, j, o);
        y[r * n + o] = y[r * n + o]! + sum;
      }
    }
  }
}

/** y = x·Wᵀ, then the rows' adapter deltas (matmul, then loraApply). */
export function matmulLora(y: Float32Array, x: Float32Array, w: WeightMatrix, m: number, segments: readonly LoraSegment[],
  cores: readonly (LoraCore | null | undefined)[]): void {
  if (y.length < m * w.rows || x.length < m * w.cols) throw new RangeError(`matmulLora: y or x shorter than ${m} rows`);
  matmul(y, x, w, m); // y: [M, N]
  loraApply(y, w.rows, x, w.cols, segments, cores);
}

/**
 * matmulGroup over a set's own matmul and matmulLora: each part as matmulLora (with segments) or matmul (without)
 * of the one x (see KernelSet.matmulGroup). The reference's, and a native set's when its addon lacks the op.
 */
export function matmulGroupOf(kernels: Pick<KernelSet, 'matmul' | 'matmulLora'>): KernelSet['matmulGroup'] {
  return (x, m, parts) => {
    if (parts.length > MAX_MATMUL_GROUP) throw new RangeError(`matmulGroup: ${parts.length} parts, at most ${MAX_MATMUL_GROUP}`);
    const k = parts[0]?.w.cols ?? 0;
    parts.forEach((part, i) => {
      if (part.w.cols !== k) throw new RangeError(`matmulGroup: part ${i} has K = ${part.w.cols}, part 0 has ${k}`);
      if (part.segments) kernels.matmulLora(part.y, x, part.w, m, part.segments, part.cores ?? []); // y: [M, N]
      else kernels.matmul(part.y, x, part.w, m); // y: [M, N]
    });
  };
}

export const matmulGroup = matmulGroupOf({ matmul, matmulLora });

/**
 * The adapter work of (segments, cores) at new rows: row i is their row rowOf[i]; with `added`, its work joins
 * in row order, runs over the same factors merged (see KernelSet.loraRows).
 */
export function loraRows(segments: readonly LoraSegment[], cores: readonly (LoraCore | null | undefined)[], rowOf: Int32Array,
  added?: LoraRows): LoraRows {
  const derived: LoraSegment[] = [];
  const derivedCores = new Array<LoraCore | undefined>(rowOf.length);
  for (const segment of segments) {
    const inside = (i: number): boolean => rowOf[i]! >= segment.start && rowOf[i]! < segment.end;
    for (let i = 0; i < rowOf.length; i++) {
      if (!inside(i)) continue;
      const start = i;
      for (; i < rowOf.length && inside(i); i++) derivedCores[i] = cores[rowOf[i]!] ?? undefined;
      derived.push({ start, end: i, a: segment.a, bt: segment.bt });
    }
  }
  if (!added || added.segments.length === 0) return { segments: derived, cores: derivedCores };
  for (const segment of added.segments) {
    for (let r = segment.start; r < segment.end; r++) derivedCores[r] = added.cores[r] ?? undefined;
  }
  const joined: LoraSegment[] = [];
  for (const segment of [...derived, ...added.segments].sort((p, q) => p.start - q.start)) {
    const last = joined[joined.length - 1];
    if (last && last.end === segment.start && last.a === segment.a && last.bt === segment.bt) {
      joined[joined.length - 1] = { start: last.start, end: segment.end, a: last.a, bt: last.bt };
    } else {
      joined.push({ start: segment.start, end: segment.end, a: segment.a, bt: segment.bt });
    }
  }
  return { segments: joined, cores: derivedCores };
}
