/**
 * Randomized range finder and a Rayleigh–Ritz block iteration for the top eigenvectors of a
 * positive semi-definite operator given only by its action (G·X), so nothing dense is formed.
 */
import type { Random } from '../tensor/random.js';
import { concatColumns, multiply } from './dense.js';
import { orthonormalColumns } from './qr.js';
import { symmetricEigen } from './symmetric-eigen.js';

/** A linear map A: [rows, cols] given by its products. */
export interface LinearOperator {
  readonly rows: number;
  readonly cols: number;
  /** A·X for X: [cols, k]; returns [rows, k]. */
  apply(x: Float64Array, k: number): Float64Array;
  /** Aᵀ·Y for Y: [rows, k]; returns [cols, k]. */
  applyTranspose(y: Float64Array, k: number): Float64Array;
}

export interface RangeFinderOptions {
  readonly random: Random;
  /** Extra random columns beyond `size` (default 2). */
  readonly oversampling?: number;
  /** Power iterations (A·Aᵀ)^q with re-orthonormalisation after each product (default 2). */
  readonly powerIterations?: number;
}

/**
 * Orthonormal Q [rows, min(size + oversampling, rows)] approximating the dominant column space of A
 * (Halko, Martinsson & Tropp, algorithm 4.4: seeded Gaussian test matrix, re-orthonormalised
 * power iterations).
 */
export function randomizedRangeFinder(operator: LinearOperator, size: number, options: RangeFinderOptions): { q: Float64Array; width: number } {
  const width = Math.min(size + (options.oversampling ?? 2), operator.rows, Math.max(operator.cols, 1));
  const omega = options.random.fillNormal(new Float64Array(operator.cols * width));
  let q = orthonormalColumns(operator.apply(omega, width), operator.rows, width);
  for (let i = 0; i < (options.powerIterations ?? 2); i++) {
    const z = orthonormalColumns(operator.applyTranspose(q, width), operator.cols, width);
    q = orthonormalColumns(operator.apply(z, width), operator.rows, width);
  }
  return { q, width };
}

export interface TopEigenOptions {
  readonly random: Random;
  /** Orthonormal start block [dim, startWidth] (e.g. the previous solution); random when absent. */
  readonly start?: Float64Array;
  readonly startWidth?: number;
  /** Random columns added to the start block (default min(rank, 8)). */
  readonly oversampling?: number;
  /** Power steps before the Rayleigh–Ritz projection (default 2). */
  readonly powerIterations?: number;
}

export interface TopEigenResult {
  /** [dim, rank] orthonormal columns. */
  readonly vectors: Float64Array;
  /** [rank] Ritz values, descending. */
  readonly values: Float64Array;
}

/**
 * Top-`rank` eigenvectors of a symmetric PSD operator G: [dim, dim] given by `applyG(X, k)`.
 * The Ritz space contains the start block, so tr(UᵀGU) of the result is never below that of the
 * start (the property the alternating fits need to be monotone). Small problems (the Ritz space
 * would cover most of the space) are solved exactly on the dense G.
 */
export function topEigenvectorsPsd(applyG: (x: Float64Array, k: number) => Float64Array, dim: number, rank: number,
  options: TopEigenOptions): TopEigenResult {
  const oversampling = options.oversampling ?? Math.min(rank, 8);
  const startWidth = options.start ? (options.startWidth ?? rank) : 0;
  const blockWidth = Math.max(startWidth, rank) + oversampling;
  if (2 * blockWidth >= dim) {
    const identity = new Float64Array(dim * dim);
    for (let i = 0; i < dim; i++) identity[i * dim + i] = 1;
    const g = applyG(identity, dim);
    const { values, vectors } = symmetricEigen(g, dim);
    return { vectors: firstColumns(vectors, dim, dim, rank), values: values.slice(0, rank) };
  }
  const randomColumns = blockWidth - startWidth;
  const random = options.random.fillNormal(new Float64Array(dim * randomColumns));
  const startBlock = options.start ? concatColumns(options.start, startWidth, random, randomColumns, dim) : random;
  const first = orthonormalColumns(startBlock, dim, blockWidth);
  let block = first;
  for (let i = 0; i < (options.powerIterations ?? 2); i++) block = orthonormalColumns(applyG(block, blockWidth), dim, blockWidth);
  const ritzWidth = 2 * blockWidth;
  const basis = orthonormalColumns(concatColumns(first, blockWidth, block, blockWidth, dim), dim, ritzWidth);
  const projected = multiply(true, false, ritzWidth, ritzWidth, dim, basis, applyG(basis, ritzWidth));
  const { values, vectors } = symmetricEigen(projected, ritzWidth);
  const top = firstColumns(vectors, ritzWidth, ritzWidth, rank);
  return { vectors: multiply(false, false, dim, rank, ritzWidth, basis, top), values: values.slice(0, rank) };
}

function firstColumns(a: Float64Array, rows: number, cols: number, count: number): Float64Array {
  const out = new Float64Array(rows * count);
  for (let i = 0; i < rows; i++) for (let j = 0; j < count; j++) out[i * count + j] = a[i * cols + j]!;
  return out;
}
