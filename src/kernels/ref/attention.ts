import type { AttentionArgs } from '../kernel-set.js';

/** Causal GQA attention over the paged KV cache (see AttentionArgs). The spec: plain two-pass softmax. */
export function attention(args: AttentionArgs): void {
  const { out, q, kCache, vCache, blockTable, blockTableStart, qStart, qLen, ctxLen, heads, kvHeads, headDim, blockSize, scale } = args;
  const groupSize = heads / kvHeads;
  const rowStride = heads * headDim;
  const slotStride = kvHeads * headDim; // one token's K (or V) in a block
  for (let s = 0; s < args.seqs; s++) {
    const context = ctxLen[s]!;
    const newTokens = qLen[s]!;
    const scores = new Float64Array(context);
    // cache offset of (position, kv head)
    const offsetOf = (position: number, kvHead: number): number => {
      const block = blockTable[blockTableStart[s]! + Math.floor(position / blockSize)]!;
      return (block * blockSize + (position % blockSize)) * slotStride + kvHead * headDim;
    };
    for (let i = 0; i < newTokens; i++) {
      const row = qStart[s]! + i;
      const position = context - newTokens + i;
      for (let h = 0; h < heads; h++) {
        const kvHead = Math.floor(h / groupSize);
        const qBase = row * rowStride + h * headDim;
        let max = -Infinity;
        for (let p = 0; p <= position; p++) {
          const kBase = offsetOf(p, kvHead);
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += q[qBase + d]! * kCache[kBase + d]!;
          scores[p] = dot * scale;
          max = Math.max(max, scores[p]!);
        }
        let sum = 0;
        for (let p = 0; p <= position; p++) {
          scores[p] = Math.exp(scores[p]! - max);
          sum += scores[p]!;
        }
        for (let d = 0; d < headDim; d++) {
          let value = 0;
          for (let p = 0; p <= position; p++) value += scores[p]! * vCache[offsetOf(p, kvHead) + d]!;
          out[qBase + d] = value / sum;
        }
      }
    }
  }
}
