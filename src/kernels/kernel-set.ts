import type { WeightMatrix } from '../tensor/weight-matrix.js';
import type { WeightDtype } from '../tensor/dtype.js';

/**
 * The one op interface. `ref/` implements it in plain TypeScript (the spec); the native addon
 * implements it in C++ with several ISA variants. Every implementation must agree with `ref`
 * within float tolerance on the shared case list (test/kernels).
 *
 * Conventions
 * - All activations are row-major f32 (`Float32Array`); shapes are given in comments as
 *   `x: [rows, cols]`. Arrays may be subarrays of larger buffers (the byteOffset is honoured).
 * - Outputs are written in place; no op allocates its output.
 * - Ops never retain a reference to an argument after returning.
 * - Dimension names (docs/glossary.md): M = rows of the batch (tokens), K = in features,
 *   N = out features, R = adapter rank, H = query heads, Hkv = key/value heads, D = head dim.
 */
export interface KernelSet {
  /** e.g. "ref", "native-avx512", "native-avx2", "native-scalar". */
  readonly name: string;

  /**
   * y[M,N] = x[M,K] · W[N,K]ᵀ, or y += … when `accumulate`. W is f32, bf16 or f16 and is
   * converted on the fly (never widened in memory).
   */
  matmul(y: Float32Array, x: Float32Array, w: WeightMatrix, m: number, accumulate?: boolean): void;

  /**
   * General f32 GEMM: C[m,n] = alpha · op(A) · op(B) + beta · C, row-major with leading dimensions.
   * op(A) is [m,k]: A is [m,lda≥k] when !transA, or [k,lda≥m] read transposed when transA.
   * op(B) is [k,n]: B is [k,ldb≥n] when !transB, or [n,ldb≥k] read transposed when transB.
   * When beta = 0, C is not read (may hold NaN).
   */
  gemmF32(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
    a: Float32Array, lda: number, b: Float32Array, ldb: number, beta: number, c: Float32Array, ldc: number): void;

  /** The same contract as gemmF32 in f64 (linear algebra where precision matters). */
  gemmF64(transA: boolean, transB: boolean, m: number, n: number, k: number, alpha: number,
    a: Float64Array, lda: number, b: Float64Array, ldb: number, beta: number, c: Float64Array, ldc: number): void;

  /** out[r,:] = x[r,:] / sqrt(mean(x[r,:]²) + eps) · weight  — x, out: [rows, dim]; weight: [dim]. out may alias x. */
  rmsnorm(out: Float32Array, x: Float32Array, weight: Float32Array, rows: number, dim: number, eps: number): void;

  /**
   * Rotary embedding in place, HF "rotate_half" layout: within each head of D, element i pairs with
   * i + D/2 (i < D/2), angle = positions[t] · invFreq[i].
   *   x'[i]       = x[i]·cos − x[i+D/2]·sin
   *   x'[i+D/2]   = x[i+D/2]·cos + x[i]·sin
   * x: [tokens, heads·D]; positions: [tokens]; invFreq: [D/2] (Llama-3 rope scaling is folded into
   * invFreq by `ropeInvFreq` in ref/rope.ts).
   */
  rope(x: Float32Array, positions: Int32Array, tokens: number, heads: number, headDim: number, invFreq: Float32Array): void;

  /** Row-wise softmax in place, numerically stable (subtract the max). x: [rows, cols]. */
  softmax(x: Float32Array, rows: number, cols: number): void;

  /**
   * Row-wise log-sum-exp: out[r] = log Σ_c exp(x[r,c]), stable (max subtracted); a row of −∞ gives −∞.
   * x: [rows, cols], read only; out: [rows]. The sampler's normaliser for token logprobs.
   */
  logSumExp(out: Float32Array, x: Float32Array, rows: number, cols: number): void;

  /**
   * Row-wise argmax: out[r] = the first c with x[r,c] the row's maximum (ties → lowest index, so greedy
   * decoding is deterministic); NaN entries are never chosen, and a row with nothing above −∞ gives 0.
   * x: [rows, cols], read only; out: [rows]. Greedy sampling's token choice.
   */
  argmax(out: Int32Array, x: Float32Array, rows: number, cols: number): void;

  /** out[i] = silu(gate[i]) · up[i] with silu(g) = g / (1 + e^−g); n elements. out may alias gate. */
  siluMul(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): void;

  /** out[i] = a[i] + b[i]; n elements; out may alias a (residual add). */
  add(out: Float32Array, a: Float32Array, b: Float32Array, n: number): void;

  /** y[r,c] += bias[c] — y: [rows, cols]; bias: [cols] (Qwen2 q/k/v biases). */
  addBias(y: Float32Array, bias: Float32Array, rows: number, cols: number): void;

  /** out[t,:] = table[ids[t],:] widened to f32 — table: [vocab, dim] in its stored dtype; out: [tokens, dim]. */
  embedding(out: Float32Array, table: WeightMatrix, ids: Int32Array, tokens: number): void;

  /**
   * Causal grouped-query attention over a paged KV cache, for prefill and decode alike.
   * See AttentionArgs. Query head h reads KV head floor(h / (H / Hkv)).
   */
  attention(args: AttentionArgs): void;

  /**
   * Raw LoRA shrink over segments: for each segment s and row r in [s.start, s.end):
   *   t[r, 0:s.a.rows] = x[r,:] · s.a[R,K]ᵀ     (t: [M, tStride]; x: [M, K])
   * Rows not covered by a segment (adapter 0, the base model) are not touched.
   * Also used for the compressed form's shared shrink, with a = Vᵀ: [R, K] per cluster.
   */
  loraShrink(t: Float32Array, tStride: number, x: Float32Array, k: number, segments: readonly LoraSegment[]): void;

  /**
   * Raw LoRA expand over segments, accumulating: for each segment s and row r in [s.start, s.end):
   *   y[r,:] += t[r, 0:R] · s.bt[R,N]     (y: [M, N]; t: [M, tStride]; scale is pre-folded into bt)
   * Also the compressed form's shared expand, with bt = Uᵀ: [R, N] per cluster. The factor is stored
   * transposed so each of its rows is one contiguous run of outputs: the kernel streams it once per
   * row tile with vector loads, whatever the rank.
   */
  loraExpand(y: Float32Array, n: number, t: Float32Array, tStride: number, segments: readonly LoraSegment[]): void;

  /**
   * Per-row core of the compressed form: for each row r with cores[r] defined:
   *   full:     out[r, 0:R] = Σ[R,R] · t[r, 0:R]     (out[r,i] = Σ_j Σ[i,j] · t[r,j])
   *   diagonal: out[r, 0:R] = σ[R] ∘ t[r, 0:R]
   * Rows whose entry is undefined/null (base model or raw adapters) are not touched.
   * t, out: [M, stride]; out must not alias t.
   */
  loraCore(out: Float32Array, t: Float32Array, stride: number, rows: number, cores: readonly (LoraCore | null | undefined)[]): void;

  /**
   * The whole adapter delta of one linear layer in one call (what the forward pass runs per slot):
   * for each segment s (a and bt both given, R = s.a.rows = s.bt.rows) and row r in [s.start, s.end):
   *   t = s.a · x[r,:]            shrink (LoRA A, or a cluster's Vᵀ)
   *   t = Σ_r · t                 when cores[r] is given (compressed rows; its rank must be R)
   *   y[r,:] += tᵀ · s.bt         expand (scaled Bᵀ, or a cluster's Uᵀ)
   * (x: [M, K]; y: [M, N]). Equal to loraShrink, loraCore and loraExpand in turn, but each row
   * tile runs all three while its rank vector is in registers/L1, so a slot costs one dispatch.
   * Rows outside every segment are not touched. An implementation may keep the checked form of a
   * segments array between calls (the native one keeps pointers to the factor and core data): once
   * passed, do not mutate segments, cores or their members, and never transfer or detach their
   * buffers (build new arrays for a new batch).
   */
  loraApply(y: Float32Array, n: number, x: Float32Array, k: number, segments: readonly LoraSegment[],
    cores: readonly (LoraCore | null | undefined)[]): void;

  /**
   * A linear layer with its rows' adapter deltas: y[M,N] = x[M,K] · W[N,K]ᵀ, then
   * loraApply(y, N, x, K, segments, cores) — the same result as matmul followed by loraApply (up to
   * rounding). The native one runs both in one pool job: the matmul, the row tiles' shrinks and
   * cores (overlapping the matmul's tail), then their expands. Rows outside every segment get x·Wᵀ
   * alone. The same rules as loraApply hold for segments and cores (an implementation may keep their
   * checked form).
   */
  matmulLora(y: Float32Array, x: Float32Array, w: WeightMatrix, m: number, segments: readonly LoraSegment[],
    cores: readonly (LoraCore | null | undefined)[]): void;

  /**
   * Several linear layers of one input (a layer's q, k and v; its gate and up): per part,
   * y[M,N] = x[M,K] · W[N,K]ᵀ, plus its rows' adapter deltas when the part has segments — the same
   * result as matmul or matmulLora on each part (up to rounding). Every W has K = x's columns; at most
   * MAX_MATMUL_GROUP parts, with distinct y arrays that do not overlap x. With few rows (below 16) the
   * native one runs the whole group in one pool job (the matmuls over the parts' weights in turn, then every
   * part's adapter tiles): a decode step then streams one run of weights per group instead of one per
   * linear, with one dispatch. With more rows each part runs as its own job, as matmulLora.
   */
  matmulGroup(x: Float32Array, m: number, parts: readonly MatmulGroupPart[]): void;
  /**
   * The same adapter work carried over to new rows: row i of the result is row rowOf[i] of (segments,
   * cores), or a row without adapter work where rowOf[i] is negative (−1) or outside every segment. Per segment s, in
   * order, one segment {start, end, a: s.a, bt: s.bt} per run of consecutive rows i with rowOf[i] in
   * [s.start, s.end); cores[i] = cores[rowOf[i]] for rows inside a segment. So loraApply of the result on x'
   * gives row i the delta loraApply of the input gives x'[i] at row rowOf[i].
   * With `added` (work on rows that map to none of theirs: an adapter new to the batch), its segments join
   * the carried ones: all in row order (by start; a stable sort), and a segment that starts where the one
   * before it ends, over the same a and bt, merged into it; added.cores[i] is row i's core inside an added
   * segment. (With overlapping segments, the order they apply in may so change, within rounding.)
   * For a batch whose rows change while its adapters stay (a request's prefill rows become one decode row; a
   * request leaves) or only gain new ones (a request arrives): an implementation that keeps the checked form
   * of segments arrays (see loraApply) carries it over here and checks only the added work, instead of every
   * factor and core again on the next call.
   */
  loraRows(segments: readonly LoraSegment[], cores: readonly (LoraCore | null | undefined)[], rowOf: Int32Array,
    added?: LoraRows): LoraRows;
}

/** The most parts one matmulGroup call takes (the addon's kMaxMatmulParts). */
export const MAX_MATMUL_GROUP = 8;

/** One linear of a matmulGroup: its output, its weight and, optionally, its rows' adapter work (as matmulLora takes it). */
export interface MatmulGroupPart {
  /** y: [M, N] */
  readonly y: Float32Array;
  /** W: [N, K] */
  readonly w: WeightMatrix;
  readonly segments?: readonly LoraSegment[];
  readonly cores?: readonly (LoraCore | null | undefined)[];
}

/** The result of KernelSet.loraRows: fresh arrays (a new batch's), over the same factors and cores. */
export interface LoraRows {
  readonly segments: readonly LoraSegment[];
  readonly cores: readonly (LoraCore | undefined)[];
}

/** A contiguous run of batch rows that share one adapter (or one cluster's shared basis). */
export interface LoraSegment {
  /** First row (inclusive). */
  readonly start: number;
  /** Last row (exclusive). */
  readonly end: number;
  /** Shrink factor, f32 [R, K] (LoRA A, or Vᵀ of a cluster). Used by loraShrink. */
  readonly a?: WeightMatrix;
  /** Expand factor transposed, [R, N] with the scale folded in ((s·B)ᵀ of LoRA, or Uᵀ of a cluster). Used by loraExpand. */
  readonly bt?: WeightMatrix;
}

/** One adapter's core in the compressed form. */
export interface LoraCore {
  readonly rank: number;
  readonly diagonal: boolean;
  /**
   * How data is stored (default f32): a Float32Array for f32, a Uint16Array of raw bits for bf16 and
   * f16 (as a WeightMatrix holds them), widened to f32 as the kernels read it.
   */
  readonly dtype?: WeightDtype;
  /** [R, R] row-major when full; [R] when diagonal. The adapter's scale is folded in. */
  readonly data: Float32Array | Uint16Array;
}

/**
 * Paged-KV attention arguments. The KV cache of one layer is a pool of blocks:
 * kCache, vCache: [numBlocks, blockSize, Hkv, D] f32.
 * The batch holds `seqs` sequences; sequence s owns query rows [qStart[s], qStart[s] + qLen[s]) of q
 * and out, and its context (all tokens so far, the new ones included, whose K/V are already written
 * to the cache) has ctxLen[s] tokens stored in blocks blockTable[blockTableStart[s] + j], j = 0…
 * The i-th new token of s sits at position ctxLen[s] − qLen[s] + i and attends to positions 0…that
 * position (causal).
 */
export interface AttentionArgs {
  /** [M, H·D] */
  readonly out: Float32Array;
  /** [M, H·D] (RoPE already applied) */
  readonly q: Float32Array;
  readonly kCache: Float32Array;
  readonly vCache: Float32Array;
  readonly blockTable: Int32Array;
  readonly blockTableStart: Int32Array;
  readonly qStart: Int32Array;
  readonly qLen: Int32Array;
  readonly ctxLen: Int32Array;
  readonly seqs: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly blockSize: number;
  /** Usually 1/√D. */
  readonly scale: number;
}
