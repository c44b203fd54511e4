import type { WeightMatrix } from '../../tensor/weight-matrix.js';
import { weightRowToF32 } from '../../tensor/weight-matrix.js';

// x, out: [rows, dim]
export function rmsnorm(out: Float32Array, x: Float32Array, weight: Float32Array, rows: number, dim: number, eps: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * dim;
    let sumSquares = 0;
    for (let c = 0; c < dim; c++) sumSquares += x[base + c]! * x[base + c]!;
    const inverse = 1 / Math.sqrt(sumSquares / dim + eps);
    for (let c = 0; c < dim; c++) out[base + c] = x[base + c]! * inverse * weight[c]!;
  }
}

// x: [tokens, heads·headDim], rotate_half layout
export function rope(x: Float32Array, positions: Int32Array, tokens: number, heads: number, headDim: number, invFreq: Float32Array): void {
  const half = headDim / 2;
  for (let t = 0; t < tokens; t++) {
    const position = positions[t]!;
    for (let i = 0; i < half; i++) {
      const angle = position * invFreq[i]!;
      const cos = Math.cos(angle);
      const sin = Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * headDim;
        const first = x[base + i]!;
        const second = x[base + i + half]!;
        x[base + i] = first * cos - second * sin;
        x[base + i + half] = second * cos + first * sin;
      }
    }
  }
}

// x: [rows, cols]; out: [rows]
export function logSumExp(out: Float32Array, x: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    let max = -Infinity;
    for (let c = 0; c < cols; c++) max = Math.max(max, x[base + c]!);
    if (max === -Infinity) {
      out[r] = -Infinity;
      continue;
    }
    let sum = 0;
    for (let c = 0; c < cols; c++) sum += Math.exp(x[base + c]! - max);
    out[r] = max + Math.log(sum);
  }
}

// x: [rows, cols]; out: [rows]
export function argmax(out: Int32Array, x: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    let best = 0;
    let bestValue = -Infinity;
    for (let c = 0; c < cols; c++) {
      if (x[base + c]! > bestValue) {
        bestValue = x[base + c]!;
        best = c;
      }
    }
    out[r] = best;
  }
}

// x: [rows, cols]
export function softmax(x: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    let max = -Infinity;
    for (let c = 0; c < cols; c++) max = Math.max(max, x[base + c]!);
    let sum = 0;
    for (let c = 0; c < cols; c++) {
      const e = Math.exp(x[base + c]! - max);
      x[base + c] = e;
      sum += e;
    }
    for (let c = 0; c < cols; c++) x[base + c] = x[base + c]! / sum;
  }
}

export function siluMul(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): void {
  for (let i = 0; i < n; i++) {
    const g = gate[i]!;
    out[i] = (g / (1 + Math.exp(-g))) * up[i]!;
  }
}

export function add(out: Float32Array, a: Float32Array, b: Float32Array, n: number): void {
  for (let i = 0; i < n; i++) out[i] = a[i]! + b[i]!;
}

// y: [rows, cols]; bias: [cols]
export function addBias(y: Float32Array, bias: Float32Array, rows: number, cols: number): void {
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) y[r * cols + c] = y[r * cols + c]! + bias[c]!;
}

// out: [tokens, dim]; table: [vocab, dim]
export function embedding(out: Float32Array, table: WeightMatrix, ids: Int32Array, tokens: number): void {
  for (let t = 0; t < tokens; t++) {
    const id = ids[t]!;
    if (id < 0 || id >= table.rows) throw new RangeError(`embedding: token id ${id} outside vocabulary of ${table.rows}`);
    weightRowToF32(table, id, out, t * table.cols);
  }
}
