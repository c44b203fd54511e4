/**
 * Paged KV cache: a fixed pool of blocks (each `blockSize` positions of every layer's K and V),
 * sized from a memory budget, handed out to sequences on demand as they grow and returned when they
 * finish, are cancelled or preempted.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { KvCacheStorage } from '../model/forward-batch.js';

export interface KvPoolShape {
  readonly layers: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly blockSize: number;
}

/** Bytes one block occupies: K and V of every layer, f32. */
export function kvBytesPerBlock(shape: KvPoolShape): number {
  return shape.layers * shape.kvHeads * shape.headDim * shape.blockSize * 2 * 4;
}

/** Number of blocks a byte budget buys. */
export function kvBlocksForBudget(shape: KvPoolShape, budgetBytes: number): number {
  return Math.floor(budgetBytes / kvBytesPerBlock(shape));
}

export class KvBlockPool {
  readonly storage: KvCacheStorage;
  readonly blockSize: number;
  readonly totalBlocks: number;
  /** Free block ids; popped from the end (LIFO keeps recently used memory warm). */
  private readonly free: number[];
  private readonly tables = new Map<number, number[]>();

  constructor(shape: KvPoolShape, budgetBytes: number) {
    for (const [field, value] of Object.entries(shape)) {
      if (!Number.isInteger(value) || value <= 0) {
        throw new SoppuError('CONFIG', `KV cache: ${field} must be a positive integer, got ${value}`, { field, limit: '> 0' });
      }
    }
    const numBlocks = kvBlocksForBudget(shape, budgetBytes);
    if (numBlocks < 1) {
      throw new SoppuError('CONFIG', `KV cache budget of ${budgetBytes} bytes holds no block (one block is ${kvBytesPerBlock(shape)} bytes)`, {
        field: 'kvBudgetBytes',
        limit: kvBytesPerBlock(shape),
      });
    }
    this.blockSize = shape.blockSize;
    this.totalBlocks = numBlocks;
    const perLayer = numBlocks * shape.blockSize * shape.kvHeads * shape.headDim;
    const k: Float32Array[] = [];
    const v: Float32Array[] = [];
    try {
      for (let l = 0; l < shape.layers; l++) {
        k.push(new Float32Array(perLayer));
        v.push(new Float32Array(perLayer));
      }
    } catch (e) {
      // past the typed-array length limit, or more than the machine gives
      throw new SoppuError('CONFIG', `KV cache budget of ${budgetBytes} bytes cannot be allocated (${(e as Error).message}); lower it`, { field: 'kvBudgetBytes' }, { cause: e });
    }
    this.storage = { numBlocks, blockSize: shape.blockSize, k, v };
    this.free = [];
    for (let b = numBlocks - 1; b >= 0; b--) this.free.push(b);
  }

  get freeBlocks(): number {
    return this.free.length;
  }

  get usedBlocks(): number {
    return this.totalBlocks - this.free.length;
  }

  /** Blocks needed to hold `positions` positions. */
  blocksFor(positions: number): number {
    return Math.ceil(positions / this.blockSize);
  }

  /** Extra blocks sequence `seq` needs to hold `positions` positions. */
  shortfall(seq: number, positions: number): number {
    const have = this.tables.get(seq)?.length ?? 0;
    return Math.max(0, this.blocksFor(positions) - have);
  }

  /**
   * Grows `seq`'s block table to hold `positions` positions. Returns false (allocating nothing) when
   * the pool has too few free blocks.
   */
  ensure(seq: number, positions: number): boolean {
    const need = this.shortfall(seq, positions);
    if (need > this.free.length) return false;
    let table = this.tables.get(seq);
    if (!table) {
      table = [];
      this.tables.set(seq, table);
    }
    for (let i = 0; i < need; i++) table.push(this.free.pop()!);
    return true;
  }

  /** The block table of `seq` (empty when it holds none). */
  table(seq: number): readonly number[] {
    return this.tables.get(seq) ?? [];
  }

  /** Returns all of `seq`'s blocks to the pool. */
  release(seq: number): void {
    const table = this.tables.get(seq);
    if (!table) return;
    for (let i = table.length - 1; i >= 0; i--) this.free.push(table[i]!);
    this.tables.delete(seq);
  }

  /** Sequences currently holding blocks. */
  get sequences(): number {
    return this.tables.size;
  }
}
