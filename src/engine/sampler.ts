/**
 * Next-token choice for one request: logit processors (repetition, frequency and presence
 * penalties), then greedy or seeded sampling with temperature, top-k, top-p and typical-p. Each
 * request owns its Sampler and its RNG, so its output never depends on what else is in the batch.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { KernelSet } from '../kernels/kernel-set.js';
import { refKernels } from '../kernels/ref/index.js';
import { Random } from '../tensor/random.js';
import type { SamplingParams } from './engine-types.js';

export interface SampledToken {
  readonly id: number;
  /** log-softmax of the processed logits at the chosen token. */
  readonly logprob: number;
  /** The top alternatives by processed logprob (empty unless asked for). */
  readonly alternatives: readonly { id: number; logprob: number }[];
}

/** Validated sampling parameters, with the rules of LoRAX/TGI for when sampling is on. */
export interface ResolvedSampling {
  readonly sample: boolean;
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly typicalP: number;
  readonly repetitionPenalty: number;
  readonly frequencyPenalty: number;
  readonly presencePenalty: number;
}

function check(field: string, value: number | undefined, ok: (v: number) => boolean, limit: string): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isFinite(value) || !ok(value)) {
    throw new SoppuError('VALIDATION', `sampling parameter ${field} must be ${limit}, got ${String(value)}`, { field, limit });
  }
}

/** Validates `params` (SoppuError VALIDATION naming the field) and decides greedy vs sampling. */
export function resolveSampling(params: SamplingParams = {}): ResolvedSampling {
  check('temperature', params.temperature, (v) => v >= 0, '>= 0');
  check('top_k', params.topK, (v) => Number.isInteger(v) && v >= 0, 'an integer >= 0');
  check('top_p', params.topP, (v) => v > 0 && v <= 1, 'in (0, 1]');
  check('typical_p', params.typicalP, (v) => v > 0 && v <= 1, 'in (0, 1]');
  check('repetition_penalty', params.repetitionPenalty, (v) => v > 0, '> 0');
  check('frequency_penalty', params.frequencyPenalty, (v) => v >= -2 && v <= 2, 'in [-2, 2]');
  check('presence_penalty', params.presencePenalty, (v) => v >= -2 && v <= 2, 'in [-2, 2]');
  check('seed', params.seed, (v) => Number.isInteger(v) && v >= 0, 'an integer >= 0');
  const temperature = params.temperature ?? 1;
  const topK = params.topK ?? 0;
  const topP = params.topP ?? 1;
  const typicalP = params.typicalP ?? 1;
  const hasWarpers = (params.temperature !== undefined && temperature !== 1) || topK > 0 || topP < 1 || typicalP < 1;
  // temperature 0 means greedy whatever else is set
  const sample = temperature > 0 && (params.doSample === true || hasWarpers);
  return {
    sample,
    temperature: temperature > 0 ? temperature : 1,
    topK,
    topP,
    typicalP,
    repetitionPenalty: params.repetitionPenalty ?? 1,
    frequencyPenalty: params.frequencyPenalty ?? 0,
    presencePenalty: params.presencePenalty ?? 0,
  };
}

export class Sampler {
  readonly settings: ResolvedSampling;
  readonly seed: number;
  private readonly random: Random;
  /** Token → occurrences in prompt and output (repetition penalty). */
  private readonly seen = new Map<number, number>();
  /** Token → occurrences in output only (frequency and presence penalties). */
  private readonly generated = new Map<number, number>();

  /** The one-row kernels: native in the engine (a pass over the vocabulary each), the reference by default. */
  private readonly rowKernels: RowKernels;

  constructor(settings: ResolvedSampling, seed: number, promptTokens: readonly number[] = [], rowKernels: RowKernels = REF_ROW_KERNELS) {
    this.settings = settings;
    this.rowKernels = rowKernels;
    this.seed = seed;
    this.random = new Random(seed);
    for (const id of promptTokens) this.seen.set(id, (this.seen.get(id) ?? 0) + 1);
  }

  /** Records a token appended to the sequence (called for each generated token). */
  observe(id: number): void {
    this.seen.set(id, (this.seen.get(id) ?? 0) + 1);
    this.generated.set(id, (this.generated.get(id) ?? 0) + 1);
  }

  /**
   * Chooses the next token from `logits` ([vocab], modified in place: it becomes the processed
   * logits) and reports its logprob and the top `alternatives` alternatives.
   */
  sample(logits: Float32Array, alternatives = 0): SampledToken {
    const s = this.settings;
    const vocab = logits.length;
    if (s.repetitionPenalty !== 1) {
      for (const id of this.seen.keys()) {
        if (id < 0 || id >= vocab) continue;
        const value = logits[id]!;
        logits[id] = value > 0 ? value / s.repetitionPenalty : value * s.repetitionPenalty;
      }
    }
    if (s.frequencyPenalty !== 0 || s.presencePenalty !== 0) {
      for (const [id, count] of this.generated) {
        if (id < 0 || id >= vocab) continue;
        logits[id] = logits[id]! - count * s.frequencyPenalty - s.presencePenalty;
      }
    }
    let chosen: number;
    if (!s.sample) {
      chosen = this.rowKernels.argmax(logits);
    } else {
      if (s.temperature !== 1) applyTemperature(logits, s.temperature);
      if (s.topK > 0 && s.topK < vocab) keepTopK(logits, s.topK);
      if (s.topP < 1) keepTopP(logits, s.topP);
      if (s.typicalP < 1) keepTypical(logits, s.typicalP);
      chosen = this.draw(logits);
    }
    const logNormalizer = this.rowKernels.logSumExp(logits);
    const logprob = logprobOf(logits[chosen]!, logNormalizer);
    const top: { id: number; logprob: number }[] = [];
    if (alternatives > 0) {
      for (const id of topIndices(logits, alternatives)) {
        if (logits[id] === -Infinity) break;
        top.push({ id, logprob: logprobOf(logits[id]!, logNormalizer) });
      }
    }
    return { id: chosen, logprob, alternatives: top };
  }

  /**
   * Draws from softmax(logits) with this request's RNG, walking tokens in id order. A row whose total is
   * not a positive finite number (a NaN or +∞ logit, or nothing above −∞) falls back to the argmax.
   */
  private draw(logits: Float32Array): number {
    const max = maxOf(logits);
    let total = 0;
    for (let i = 0; i < logits.length; i++) if (logits[i] !== -Infinity) total += Math.exp(logits[i]! - max);
    if (!(total > 0 && total < Infinity)) return argmax(logits);
    const target = this.random.next() * total;
    let cumulative = 0;
    let last = 0;
    for (let i = 0; i < logits.length; i++) {
      if (logits[i] === -Infinity) continue;
      cumulative += Math.exp(logits[i]! - max);
      last = i;
      if (cumulative > target) return i;
    }
    return last;
  }
}

/** The sampler's per-row kernels: log Σ exp (logprob normaliser) and argmax (greedy choice). */
export interface RowKernels {
  logSumExp(row: Float32Array): number;
  argmax(row: Float32Array): number;
}

/** RowKernels over one row of `kernels` (results land in small reused arrays: one caller at a time). */
export function rowKernelsOf(kernels: Pick<KernelSet, 'logSumExp' | 'argmax'>): RowKernels {
  const normalizer = new Float32Array(1);
  const index = new Int32Array(1);
  return {
    logSumExp(row) {
      kernels.logSumExp(normalizer, row, 1, row.length);
      return normalizer[0]!;
    },
    argmax(row) {
      kernels.argmax(index, row, 1, row.length);
      return index[0]!;
    },
  };
}

const REF_ROW_KERNELS = rowKernelsOf(refKernels);

/** First index of the maximum (ties → lowest id, so greedy is deterministic): the reference kernel on one row. */
export function argmax(x: Float32Array): number {
  return REF_ROW_KERNELS.argmax(x);
}

/**
 * logit − log Σ exp, never NaN: a row with nothing above −∞ (or a NaN from upstream) reports −∞, which the
 * servers render as they render any impossible token (OpenAI: −9999).
 */
function logprobOf(logit: number, logNormalizer: number): number {
  const logprob = logit - logNormalizer;
  return Number.isNaN(logprob) ? -Infinity : logprob;
}

function maxOf(x: Float32Array): number {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i]! > max) max = x[i]!;
  return max;
}


/**
 * Divides the row by `temperature` after shifting it so its maximum is 0: (x − max) / T. Softmax (and so
 * every warper and the draw) is unchanged by the shift, and a tiny T (validation takes any T > 0, down to
 * 5e-324) can no longer overflow float32 into ±∞ or NaN: the maximum stays 0 and the rest go to at worst
 * −∞, so the draw becomes greedy and the chosen token's logprob stays finite. Dividing (not multiplying by
 * 1 / T, which is +∞ for the smallest T) keeps 0 / T = 0.
 */
function applyTemperature(logits: Float32Array, temperature: number): void {
  const max = maxOf(logits);
  // all −∞ (nothing to scale) or a +∞ logit (x − max would be NaN): leave the row to draw()'s fallback
  if (!Number.isFinite(max)) return;
  for (let i = 0; i < logits.length; i++) logits[i] = (logits[i]! - max) / temperature;
}

/**
 * Indices of the `k` largest entries, largest first (ties → lower id first; NaN never chosen). An
 * insertion into a sorted list of at most `k`: meant for small `k` (the alternatives, at most 100).
 */
export function topIndices(x: Float32Array, k: number): number[] {
  const chosen: number[] = [];
  for (let i = 0; i < x.length; i++) {
    const value = x[i]!;
    if (Number.isNaN(value)) continue;
    if (chosen.length === k && value <= x[chosen[k - 1]!]!) continue;
    let at = chosen.length;
    while (at > 0 && x[chosen[at - 1]!]! < value) at--;
    chosen.splice(at, 0, i);
    if (chosen.length > k) chosen.pop();
  }
  return chosen;
}

/** Indices of finite-probability entries sorted by logit, largest first (stable by id). */
function sortedCandidates(logits: Float32Array): number[] {
  const ids: number[] = [];
  for (let i = 0; i < logits.length; i++) if (logits[i] !== -Infinity) ids.push(i);
  ids.sort((p, q) => logits[q]! - logits[p]! || p - q);
  return ids;
}

/** Up to this k, keepTopK's threshold comes from topIndices: one comparison per entry in practice. */
const SMALL_TOP_K = 64;

/**
 * Top-k: masks every entry below the k-th largest value (counted with multiplicity); ties with the k-th
 * value are kept, as HF does. A small k reads the threshold off topIndices; any larger k (top_k is bounded
 * only by the vocabulary, and this runs in the step loop) gets it from a selection, O(vocab).
 */
function keepTopK(logits: Float32Array, k: number): void {
  let threshold: number;
  if (k <= SMALL_TOP_K) {
    const top = topIndices(logits, k);
    threshold = top.length === k ? logits[top[k - 1]!]! : -Infinity;
  } else {
    threshold = kthLargest(logits, k);
  }
  for (let i = 0; i < logits.length; i++) if (logits[i]! < threshold) logits[i] = -Infinity;
}

/** Scratch for kthLargest (grown as needed; the sampler runs synchronously, one row at a time). */
let selectScratch = new Float32Array(0);

/**
 * The k-th largest non-NaN value of `x` counted with multiplicity (k ≥ 1): what the k-th entry of
 * topIndices(x, k) holds; −∞ when `x` has fewer than k non-NaN values. Quickselect with a median-of-three
 * pivot and a three-way partition (rows full of equal values, such as −∞ after a tiny temperature, cost
 * one pass), over a scratch copy; should partitioning ever do more than a few passes' worth of work, the
 * rest is sorted instead, so the worst case stays O(n log n).
 */
function kthLargest(x: Float32Array, k: number): number {
  if (selectScratch.length < x.length) selectScratch = new Float32Array(x.length);
  const values = selectScratch;
  let count = 0;
  for (let i = 0; i < x.length; i++) {
    const value = x[i]!;
    if (!Number.isNaN(value)) values[count++] = value;
  }
  if (k > count || k < 1) return -Infinity;
  const target = count - k; // its index in ascending order
  let lo = 0;
  let hi = count - 1;
  let work = 0;
  while (lo < hi) {
    work += hi - lo + 1;
    if (work > 8 * count) {
      values.subarray(lo, hi + 1).sort();
      break;
    }
    const a = values[lo]!;
    const b = values[lo + ((hi - lo) >> 1)]!;
    const c = values[hi]!;
    const pivot = a < b ? (b < c ? b : a < c ? c : a) : a < c ? a : b < c ? c : b;
    // [lo, lt) < pivot, [lt, i) == pivot, (gt, hi] > pivot
    let lt = lo;
    let i = lo;
    let gt = hi;
    while (i <= gt) {
      const value = values[i]!;
      if (value < pivot) {
        values[i++] = values[lt]!;
        values[lt++] = value;
      } else if (value > pivot) {
        values[i] = values[gt]!;
        values[gt--] = value;
      } else {
        i++;
      }
    }
    if (target < lt) hi = lt - 1;
    else if (target > gt) lo = gt + 1;
    else return pivot;
  }
  return values[target]!;
}

function probabilities(logits: Float32Array, ids: readonly number[]): Float64Array {
  const max = logits[ids[0]!]!;
  const probs = new Float64Array(ids.length);
  let sum = 0;
  for (let j = 0; j < ids.length; j++) {
    probs[j] = Math.exp(logits[ids[j]!]! - max);
    sum += probs[j]!;
  }
  for (let j = 0; j < ids.length; j++) probs[j] = probs[j]! / sum;
  return probs;
}

/** Nucleus: keep the smallest most-likely set whose probability reaches p (at least one token). */
function keepTopP(logits: Float32Array, p: number): void {
  const ids = sortedCandidates(logits);
  if (ids.length === 0) return;
  const probs = probabilities(logits, ids);
  let cumulative = 0;
  let keep = ids.length;
  for (let j = 0; j < ids.length; j++) {
    cumulative += probs[j]!;
    if (cumulative >= p) {
      keep = j + 1;
      break;
    }
  }
  for (let j = keep; j < ids.length; j++) logits[ids[j]!] = -Infinity;
}

/** Typical sampling (Meister et al.), as HF TypicalLogitsWarper: keep tokens closest to the entropy. */
function keepTypical(logits: Float32Array, mass: number): void {
  const ids = sortedCandidates(logits);
  if (ids.length === 0) return;
  const probs = probabilities(logits, ids);
  let entropy = 0;
  for (const p of probs) if (p > 0) entropy -= p * Math.log(p);
  const order = ids.map((_, j) => j);
  const shifted = (j: number): number => Math.abs(-Math.log(probs[j]!) - entropy);
  order.sort((p, q) => shifted(p) - shifted(q) || ids[p]! - ids[q]!);
  let cumulative = 0;
  let keep = order.length;
  for (let j = 0; j < order.length; j++) {
    cumulative += probs[order[j]!]!;
    if (cumulative >= mass) {
      keep = j + 1;
      break;
    }
  }
  // HF removes only tokens strictly farther from the entropy than the last kept: ties with it stay
  const last = keep > 0 ? shifted(order[keep - 1]!) : 0;
  while (keep < order.length && shifted(order[keep]!) <= last) keep++;
  for (let j = keep; j < order.length; j++) logits[ids[order[j]!]!] = -Infinity;
}
