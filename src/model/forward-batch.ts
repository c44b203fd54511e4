/**
 * What one forward step takes: a flat batch of M token rows from one or more sequences, with the
 * paged-KV metadata the attention kernel needs (see AttentionArgs in kernels/kernel-set.ts).
 * The engine builds it; the model's forward pass consumes it.
 */
export interface ForwardBatch {
  /** Token ids, [M]. Rows of one sequence are contiguous and in position order. */
  readonly tokens: Int32Array;
  /** Absolute position of each row, [M]. */
  readonly positions: Int32Array;
  /** Number of sequences in the batch. */
  readonly seqs: number;
  /** Per sequence: first row, number of new rows, and context length after this step (new rows included). */
  readonly qStart: Int32Array;
  readonly qLen: Int32Array;
  readonly ctxLen: Int32Array;
  /** Concatenated block tables; sequence s's blocks start at blockTableStart[s]. */
  readonly blockTable: Int32Array;
  readonly blockTableStart: Int32Array;
  /** Rows whose logits are wanted (usually each sequence's last row), in output order. */
  readonly logitRows: Int32Array;
}

/**
 * Paged KV cache storage for all layers. Layer l keeps k[l], v[l]: [numBlocks, blockSize, Hkv, D] f32.
 * The forward pass writes the K/V of each new row at (blockTable[pos / blockSize], pos % blockSize)
 * before attention reads them.
 */
export interface KvCacheStorage {
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly k: readonly Float32Array[];
  readonly v: readonly Float32Array[];
}
