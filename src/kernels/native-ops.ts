/**
 * The native non-matmul ops (rmsnorm, rope, softmax, logSumExp, argmax, siluMul, add, addBias, embedding, attention,
 * loraShrink, loraExpand, loraCore, loraApply, matmulLora, matmulGroup, loraRows) bound to one ISA variant of the addon. Every op validates its
 * sizes and indices here and throws SoppuError('KERNEL') naming the op and the sizes before the
 * native call; the addon checks again (so native code never reads out of bounds) and any error it
 * raises is rethrown as the same SoppuError.
 */
import { MAX_MATMUL_GROUP, type AttentionArgs, type KernelSet, type LoraCore, type LoraSegment, type MatmulGroupPart } from './kernel-set.js';
import type { NativeAddon } from './native-addon.js';
import { guarded } from './native-core-ops.js';
import type { WeightMatrix } from '../tensor/weight-matrix.js';
import { SoppuError } from '../errors/soppu-error.js';
import { holdsDtype } from '../tensor/dtype.js';
import { loraRows as refLoraRows } from './ref/lora.js';

type NativeFunction = (...args: unknown[]) => unknown;

/** The ops of this module, as KernelSet members. */
export type NativeOps = Pick<KernelSet, 'rmsnorm' | 'rope' | 'softmax' | 'logSumExp' | 'argmax' | 'siluMul' | 'add' | 'addBias' | 'embedding'
  | 'attention' | 'loraShrink' | 'loraExpand' | 'loraCore' | 'loraApply' | 'matmulLora' | 'matmulGroup' | 'loraRows'>;

const DTYPE_INDEX = { f32: 0, bf16: 1, f16: 2 } as const;

function kernelError(op: string, message: string, context: Record<string, unknown> = {}): SoppuError {
  return new SoppuError('KERNEL', `${op}: ${message}`, { field: op, ...context });
}

/** Throws unless `value` is an integer ≥ minimum. */
function checkInteger(op: string, name: string, value: number, minimum: number): void {
  if (!Number.isInteger(value) || value < minimum || value >= 2 ** 31) {
    throw kernelError(op, `${name} = ${value} must be an integer >= ${minimum} and < 2^31`, { limit: minimum });
  }
}

/** Throws unless the array holds at least `needed` elements (a name built per call is given as a function: the check runs per slot and row). */
function checkLength(op: string, name: string | (() => string), array: { length: number }, needed: number): void {
  if (array.length < needed) {
    throw kernelError(op, `${typeof name === 'string' ? name : name()} has ${array.length} elements, needs ${needed}`, { limit: needed });
  }
}

/**
 * Throws unless `array` lives in a private buffer. The addon checks an index array, then reads it again as it
 * works: another thread writing a SharedArrayBuffer in between would make it index out of bounds.
 */
function checkNotShared(op: string, name: string, array: ArrayBufferView): void {
  if (typeof SharedArrayBuffer !== 'undefined' && array.buffer instanceof SharedArrayBuffer) {
    throw kernelError(op, `${name} is backed by a SharedArrayBuffer; index arrays must be private to the call`);
  }
}

/** Binds the native ops of one ISA variant; missing exports (an older addon) leave the reference op. */
export function nativeOps(addon: NativeAddon, variantIndex: number): Partial<NativeOps> {
  const fn = (name: string): NativeFunction | undefined => {
    const f = addon[name];
    return typeof f === 'function' ? (f as NativeFunction) : undefined;
  };
  // Calls the addon, turning its argument errors into SoppuError('KERNEL').
  const call = (op: string, f: NativeFunction, ...args: unknown[]): unknown => guarded(op, () => f(variantIndex, ...args));
  const ops: Partial<NativeOps> = {};

  const rmsnorm = fn('rmsnorm');
  if (rmsnorm) {
    ops.rmsnorm = (out, x, weight, rows, dim, eps) => {
      checkInteger('rmsnorm', 'rows', rows, 0);
      checkInteger('rmsnorm', 'dim', dim, 1);
      checkLength('rmsnorm', 'x', x, rows * dim);
      checkLength('rmsnorm', 'out', out, rows * dim);
      checkLength('rmsnorm', 'weight', weight, dim);
      call('rmsnorm', rmsnorm, out, x, weight, rows, dim, eps);
    };
  }

  const rope = fn('rope');
  if (rope) {
    ops.rope = (x, positions, tokens, heads, headDim, invFreq) => {
      checkNotShared('rope', 'positions', positions);
      checkInteger('rope', 'tokens', tokens, 0);
      checkInteger('rope', 'heads', heads, 1);
      checkInteger('rope', 'headDim', headDim, 2);
      if (headDim % 2 !== 0) throw kernelError('rope', `headDim ${headDim} must be even`);
      checkLength('rope', 'x', x, tokens * heads * headDim);
      checkLength('rope', 'positions', positions, tokens);
      checkLength('rope', 'invFreq', invFreq, headDim / 2);
      call('rope', rope, x, positions, tokens, heads, headDim, invFreq);
    };
  }

  const softmax = fn('softmax');
  if (softmax) {
    ops.softmax = (x, rows, cols) => {
      checkInteger('softmax', 'rows', rows, 0);
      checkInteger('softmax', 'cols', cols, 0);
      checkLength('softmax', 'x', x, rows * cols);
      call('softmax', softmax, x, rows, cols);
    };
  }

  // row reductions, out[r] from x[r, :] (x: [rows, cols], read only; out: [rows])
  for (const op of ['logSumExp', 'argmax'] as const) {
    const f = fn(op);
    if (!f) continue;
    const reduce = (out: Float32Array | Int32Array, x: Float32Array, rows: number, cols: number): void => {
      checkInteger(op, 'rows', rows, 0);
      checkInteger(op, 'cols', cols, 1);
      checkLength(op, 'x', x, rows * cols);
      checkLength(op, 'out', out, rows);
      call(op, f, out, x, rows, cols);
    };
    if (op === 'logSumExp') ops.logSumExp = reduce;
    else ops.argmax = reduce;
  }

  const siluMul = fn('siluMul');
  if (siluMul) {
    ops.siluMul = (out, gate, up, n) => {
      checkInteger('siluMul', 'n', n, 0);
      checkLength('siluMul', 'out', out, n);
      checkLength('siluMul', 'gate', gate, n);
      checkLength('siluMul', 'up', up, n);
      call('siluMul', siluMul, out, gate, up, n);
    };
  }

  const add = fn('add');
  if (add) {
    ops.add = (out, a, b, n) => {
      checkInteger('add', 'n', n, 0);
      checkLength('add', 'out', out, n);
      checkLength('add', 'a', a, n);
      checkLength('add', 'b', b, n);
      call('add', add, out, a, b, n);
    };
  }

  const addBias = fn('addBias');
  if (addBias) {
    ops.addBias = (y, bias, rows, cols) => {
      checkInteger('addBias', 'rows', rows, 0);
      checkInteger('addBias', 'cols', cols, 0);
      checkLength('addBias', 'y', y, rows * cols);
      checkLength('addBias', 'bias', bias, cols);
      call('addBias', addBias, y, bias, rows, cols);
    };
  }

  const embedding = fn('embedding');
  if (embedding) {
    ops.embedding = (out: Float32Array, table: WeightMatrix, ids: Int32Array, tokens: number) => {
      checkInteger('embedding', 'tokens', tokens, 0);
      checkNotShared('embedding', 'ids', ids);
      checkLength('embedding', 'ids', ids, tokens);
      checkLength('embedding', 'out', out, tokens * table.cols);
      checkLength('embedding', 'table', table.data, table.rows * table.cols);
      for (let t = 0; t < tokens; t++) {
        const id = ids[t]!;
        if (id < 0 || id >= table.rows) {
          throw kernelError('embedding', `token id ${id} at position ${t} is outside the vocabulary of ${table.rows}`,
            { limit: table.rows });
        }
      }
      call('embedding', embedding, out, table.data, DTYPE_INDEX[table.dtype], table.rows, table.cols, ids, tokens);
    };
  }

  const attention = fn('attention');
  if (attention) {
    ops.attention = (args: AttentionArgs) => {
      validateAttention(args);
      call('attention', attention, args.out, args.q, args.kCache, args.vCache, args.blockTable, args.blockTableStart,
        args.qStart, args.qLen, args.ctxLen, args.seqs, args.heads, args.kvHeads, args.headDim, args.blockSize, args.scale);
    };
  }

  const loraShrink = fn('loraShrink');
  if (loraShrink) {
    ops.loraShrink = (t, tStride, x, k, segments) => {
      checkInteger('loraShrink', 'tStride', tStride, 1);
      checkInteger('loraShrink', 'k', k, 1);
      const flat = flattenSegments('loraShrink', segments, 'a', (w) => w.cols === k && w.rows <= tStride,
        `[R <= tStride ${tStride}, k ${k}]`);
      checkLength('loraShrink', 't', t, flat.rows * tStride);
      checkLength('loraShrink', 'x', x, flat.rows * k);
      call('loraShrink', loraShrink, t, tStride, x, k, flat.rows, flat.starts, flat.ends, flat.weights, flat.ranks, flat.dtypes);
    };
  }

  const loraExpand = fn('loraExpand');
  if (loraExpand) {
    ops.loraExpand = (y, n, t, tStride, segments) => {
      checkInteger('loraExpand', 'n', n, 1);
      checkInteger('loraExpand', 'tStride', tStride, 1);
      const flat = flattenSegments('loraExpand', segments, 'bt', (w) => w.cols === n && w.rows <= tStride,
        `[R <= tStride ${tStride}, n ${n}]`);
      checkLength('loraExpand', 'y', y, flat.rows * n);
      checkLength('loraExpand', 't', t, flat.rows * tStride);
      call('loraExpand', loraExpand, y, n, t, tStride, flat.rows, flat.starts, flat.ends, flat.weights, flat.ranks, flat.dtypes);
    };
  }

  const loraCore = fn('loraCore');
  if (loraCore) {
    ops.loraCore = (out, t, stride, rows, cores) => {
      checkInteger('loraCore', 'stride', stride, 1);
      checkInteger('loraCore', 'rows', rows, 0);
      checkLength('loraCore', 'out', out, rows * stride);
      checkLength('loraCore', 't', t, rows * stride);
      const flat = flattenCores('loraCore', cores, rows, stride);
      if (flat.data.length === 0) return;
      call('loraCore', loraCore, out, t, stride, rows, flat.coreOfRow, flat.data, flat.ranks, flat.diagonal, flat.dtypes);
    };
  }

  const loraApply = fn('loraApply');
  const loraApplyPlan = fn('loraApplyPlan');
  const matmulGroup = fn('matmulGroup');
  if (loraApply && loraApplyPlan) {
    // A checked plan per segments array, held by the addon: the engine passes the same plan's arrays for
    // every step whose batch is unchanged, and reading ~40 arrays per call cost more than a small slot's kernel.
    const applyCache = new WeakMap<readonly LoraSegment[], FlatApply>();
    const ints = new IntScratch();
    const planFor = (op: string, n: number, k: number, segments: readonly LoraSegment[], given: readonly (LoraCore | null | undefined)[]): FlatApply => {
      const cores = coresKey(given);
      let flat = applyCache.get(segments);
      if (!flat || flat.coresSource !== cores || flat.n !== n || flat.k !== k) {
        ints.reset();
        const checked = flattenApply(op, segments, cores, n, k, ints);
        const plan = call(op, loraApplyPlan, n, k, checked.rows, checked.shrink.starts, checked.shrink.ends, checked.shrink.weights, checked.shrink.ranks,
          checked.shrink.dtypes, checked.expand.weights, checked.expand.ranks, checked.expand.dtypes, checked.cores.coreOfRow,
          checked.cores.data, checked.cores.ranks, checked.cores.diagonal, checked.cores.dtypes);
        // the addon copied the integers: keep only what later calls read (the views in `ints` are reused)
        flat = { n, k, rows: checked.rows, coresSource: cores, plan };
        applyCache.set(segments, flat);
      }
      return flat;
    };
    ops.loraApply = (y, n, x, k, segments, cores) => {
      const flat = planFor('loraApply', n, k, segments, cores);
      checkLength('loraApply', 'y', y, flat.rows * n);
      checkLength('loraApply', 'x', x, flat.rows * k);
      call('loraApply', loraApply, y, x, flat.plan);
    };
    const loraPlanRows = fn('loraPlanRows');
    if (loraPlanRows) {
      // the new arrays as the reference builds them; a checked plan of the old ones carries over to them natively
      ops.loraRows = (segments, cores, rowOf, added) => {
        if (!(rowOf instanceof Int32Array)) throw kernelError('loraRows', 'rowOf must be an Int32Array');
        checkNotShared('loraRows', 'rowOf', rowOf);
        const derived = refLoraRows(segments, cores, rowOf, added);
        const flat = applyCache.get(segments);
        if (flat && flat.coresSource === coresKey(cores) && derived.segments.length > 0) {
          // the added work is checked as any new work is (only its own factors and cores are read)
          const addedPlan = added && added.segments.length > 0 ? planFor('loraRows', flat.n, flat.k, added.segments, added.cores).plan : undefined;
          const plan = call('loraRows', loraPlanRows, flat.plan, rowOf, addedPlan);
          const rows = derived.segments.reduce((most, segment) => Math.max(most, segment.end), 0);
          applyCache.set(derived.segments, { n: flat.n, k: flat.k, rows, coresSource: coresKey(derived.cores), plan });
        }
        return derived;
      };
    }
    if (matmulGroup) {
      // (y, w data, dtype code, n, plan or undefined) per part, checked as `op` (the caller's name for it)
      const groupArgs = (op: string, x: Float32Array, m: number, parts: readonly MatmulGroupPart[]): unknown[] => {
        checkInteger(op, 'm', m, 0);
        if (parts.length > MAX_MATMUL_GROUP) throw kernelError(op, `${parts.length} parts, at most ${MAX_MATMUL_GROUP}`, { limit: MAX_MATMUL_GROUP });
        const k = parts[0]!.w.cols;
        checkLength(op, 'x', x, m * k);
        const flat: unknown[] = [];
        parts.forEach((part, i) => {
          const { y, w, segments } = part;
          const n = w.rows;
          const name = parts.length === 1 ? '' : `part ${i}: `;
          if (w.cols !== k) throw kernelError(op, `${name}w has K = ${w.cols}, part 0 has ${k}`, { limit: k });
          checkLength(op, () => `${name}w (${w.dtype} [${n}, ${k}])`, w.data, n * k);
          if (!holdsDtype(w.dtype, w.data)) throw kernelError(op, `${name}weight dtype ${w.dtype} does not match its ${w.data.constructor.name} data`);
          let plan: unknown;
          if (segments) {
            const built = planFor(op, n, k, segments, part.cores ?? NO_CORES);
            if (built.rows > m) throw kernelError(op, `${name}segments reach row ${built.rows}, the batch has ${m} rows`, { limit: m });
            plan = built.plan;
          }
          checkLength(op, () => `${name}y`, y, m * n);
          flat.push(y, w.data, DTYPE_INDEX[w.dtype], n, plan);
        });
        return [x, m, k, flat];
      };
      ops.matmulGroup = (x, m, parts) => {
        if (parts.length > 0) call('matmulGroup', matmulGroup, ...groupArgs('matmulGroup', x, m, parts));
      };
      ops.matmulLora = (y, x, w, m, segments, cores) => {
        call('matmulLora', matmulGroup, ...groupArgs('matmulLora', x, m, [{ y, w, segments, cores }]));
      };
    }
  }

  return ops;
}

/** The addon's loraApply rank limit (its per-thread rank vectors). */
const MAX_APPLY_RANK = 4096;

/** A checked loraApply plan of one segments array. */
interface FlatApply {
  readonly n: number;
  readonly k: number;
  readonly rows: number;
  /** The cores array this was built with (a new array means new cores). */
  readonly coresSource: readonly (LoraCore | null | undefined)[];
  /**
   * The addon's checked copy of segments and cores: raw pointers into their factor and core arrays, which
   * the segments array (this entry's key) and coresSource keep alive for as long as the plan can be used.
   */
  readonly plan: unknown;
}

/** The flattened form flattenApply checks and builds, for one loraApplyPlan call. */
interface FlatApplyInput {
  readonly rows: number;
  readonly shrink: FlatSegments;
  readonly expand: FlatSegments;
  readonly cores: FlatCores;
}

/**
 * Reused storage for the small integer arrays of a plan call: a typed array of at most 64 bytes lives on
 * V8's heap, and the addon's first access to one moves it off-heap (a malloc and a copy per array, ~8 per
 * slot plan, and every slot's plan is rebuilt when the batch's composition changes). Views taken after
 * reset() are valid until the next reset().
 */
class IntScratch {
  private buffer = new Int32Array(4096);
  private used = 0;

  reset(): void {
    this.used = 0;
  }

  /** A zeroed view of `length` ints (a larger buffer when full; earlier views keep the old one). */
  take(length: number): Int32Array {
    if (this.used + length > this.buffer.length) {
      this.buffer = new Int32Array(Math.max(2 * this.buffer.length, length));
      this.used = 0;
    }
    const view = this.buffer.subarray(this.used, this.used + length);
    this.used += length;
    return view.fill(0);
  }
}

/** No cores (one frozen array: see coresKey). */
const NO_CORES: readonly (LoraCore | null | undefined)[] = Object.freeze([]);

/**
 * The cores array a cached plan is keyed on: every empty one is NO_CORES, so a caller passing a fresh `[]` per
 * call (a part without cores) finds the plan cached for its segments instead of rebuilding it.
 */
function coresKey(cores: readonly (LoraCore | null | undefined)[]): readonly (LoraCore | null | undefined)[] {
  return cores.length === 0 ? NO_CORES : cores;
}

/** Checks loraApply's segments and cores (everything but y and x) and flattens them for the addon. */
function flattenApply(op: string, segments: readonly LoraSegment[], cores: readonly (LoraCore | null | undefined)[], n: number, k: number,
  ints: IntScratch): FlatApplyInput {
  checkInteger(op, 'n', n, 1);
  checkInteger(op, 'k', k, 1);
  // one pass, and A and Bᵀ share starts, ends and ranks: a composition change rebuilds every slot's plan
  const count = segments.length;
  const starts = ints.take(count);
  const ends = ints.take(count);
  const ranks = ints.take(count);
  const aDtypes = ints.take(count);
  const btDtypes = ints.take(count);
  const aWeights: (Float32Array | Uint16Array)[] = [];
  const btWeights: (Float32Array | Uint16Array)[] = [];
  const aShape = (w: WeightMatrix): boolean => w.cols === k && w.rows <= MAX_APPLY_RANK;
  const btShape = (w: WeightMatrix): boolean => w.cols === n && w.rows <= MAX_APPLY_RANK;
  let rows = 0;
  for (let s = 0; s < count; s++) {
    const segment = segments[s]!;
    const a = checkedFactor(op, segment, s, 'a', aShape, () => `[R <= ${MAX_APPLY_RANK}, k ${k}]`);
    const bt = checkedFactor(op, segment, s, 'bt', btShape, () => `[R <= ${MAX_APPLY_RANK}, n ${n}]`);
    if (a.rows !== bt.rows) throw kernelError(op, `segment ${s}: a has rank ${a.rows}, bt has rank ${bt.rows}`);
    starts[s] = segment.start;
    ends[s] = segment.end;
    ranks[s] = a.rows;
    aDtypes[s] = DTYPE_INDEX[a.dtype];
    btDtypes[s] = DTYPE_INDEX[bt.dtype];
    aWeights.push(a.data);
    btWeights.push(bt.data);
    rows = Math.max(rows, segment.end);
  }
  const shrink: FlatSegments = { rows, starts, ends, ranks, dtypes: aDtypes, weights: aWeights };
  const expand: FlatSegments = { rows, starts, ends, ranks, dtypes: btDtypes, weights: btWeights };
  // only the cores of rows some segment covers: the reference never reads the others (a row outside every
  // segment is the base model's, whatever its entry holds)
  const covered = ints.take(rows);
  for (let s = 0; s < count; s++) covered.fill(1, starts[s]!, ends[s]!);
  const flatCores = flattenCores(op, cores, rows, MAX_APPLY_RANK, ints, covered);
  for (let s = 0; s < segments.length; s++) {
    const segment = segments[s]!;
    for (let r = segment.start; r < segment.end; r++) {
      const index = flatCores.coreOfRow[r]!;
      if (index >= 0 && flatCores.ranks[index] !== shrink.ranks[s]) {
        throw kernelError(op, `row ${r} has a core of rank ${flatCores.ranks[index]}, its segment rank ${shrink.ranks[s]}`);
      }
    }
  }
  return { rows, shrink, expand, cores: flatCores };
}

interface FlatCores {
  /** Per row: index into data, or −1. */
  coreOfRow: Int32Array;
  data: (Float32Array | Uint16Array)[];
  ranks: Int32Array;
  /** 1 when diagonal. */
  diagonal: Int32Array;
  /** 0 f32, 1 bf16, 2 f16 per core. */
  dtypes: Int32Array;
}

/**
 * Cores of rows [0, rows) as flat arrays for the addon; checks every core's rank and length. A row whose
 * core is the previous row's shares its entry (a request's prefill rows, or requests of one adapter:
 * the engine orders rows by adapter); any other row gets its own.
 */
function flattenCores(op: string, allCores: readonly (LoraCore | null | undefined)[], rows: number, maxRank: number,
  ints?: IntScratch, covered?: Int32Array): FlatCores {
  const intArray = (length: number): Int32Array => (ints ? ints.take(length) : new Int32Array(length));
  // `covered` given: a row it marks 0 counts as having no core (row −1 has none either)
  const coreAt = (r: number): LoraCore | null | undefined => (covered && !covered[r] ? undefined : allCores[r]);
  const coreOfRow = intArray(rows).fill(-1);
  let count = 0;
  for (let r = 0; r < rows; r++) {
    const core = coreAt(r);
    if (core && core !== coreAt(r - 1)) count++;
  }
  const data: (Float32Array | Uint16Array)[] = [];
  const ranks = intArray(count);
  const diagonal = intArray(count);
  const dtypes = intArray(count);
  for (let r = 0; r < rows; r++) {
    const core = coreAt(r);
    if (!core) continue;
    if (core === coreAt(r - 1)) {
      coreOfRow[r] = coreOfRow[r - 1]!;
      continue;
    }
    const needed = core.diagonal ? core.rank : core.rank * core.rank;
    if (!Number.isInteger(core.rank) || core.rank < 1 || core.rank > maxRank) {
      throw kernelError(op, `row ${r}: core rank ${core.rank} outside [1, ${maxRank}]`, { limit: maxRank });
    }
    checkLength(op, () => `core of row ${r}`, core.data, needed);
    const dtype = core.dtype ?? 'f32';
    if (!holdsDtype(dtype, core.data)) {
      throw kernelError(op, `row ${r}: core of dtype ${dtype} holds a ${core.data.constructor.name}`);
    }
    const index = data.length;
    data.push(core.data);
    ranks[index] = core.rank;
    diagonal[index] = core.diagonal ? 1 : 0;
    dtypes[index] = DTYPE_INDEX[dtype];
    coreOfRow[r] = index;
  }
  return { coreOfRow, data, ranks, diagonal, dtypes };
}

interface FlatSegments {
  rows: number;
  starts: Int32Array;
  ends: Int32Array;
  ranks: Int32Array;
  /** 0 f32, 1 bf16, 2 f16 per segment. */
  dtypes: Int32Array;
  weights: (Float32Array | Uint16Array)[];
}

/**
 * A segment's factor after the checks every flattening makes: present, rows a valid range, shape per
 * `shapeOk` (`expected` describes it, built only for the error), data long enough.
 */
function checkedFactor(op: string, segment: LoraSegment, s: number, factor: 'a' | 'bt', shapeOk: (w: WeightMatrix) => boolean,
  expected: () => string): WeightMatrix {
  const w = segment[factor];
  if (!w) throw kernelError(op, `segment ${s} has no ${factor}`);
  if (!Number.isInteger(segment.start) || !Number.isInteger(segment.end) || segment.start < 0 || segment.end < segment.start
    || segment.end >= 2 ** 31) {
    throw kernelError(op, `segment ${s} rows [${segment.start}, ${segment.end}) are not a valid range`);
  }
  if (!shapeOk(w) || w.rows < 1 || w.cols < 1) {
    throw kernelError(op, `segment ${s}: ${factor} is [${w.rows}, ${w.cols}], expected ${expected()}`);
  }
  checkLength(op, () => `segment ${s} ${factor}`, w.data, w.rows * w.cols);
  return w;
}

/** Segments as flat arrays for the addon; checks every segment's rows and factor shape. */
function flattenSegments(op: string, segments: readonly LoraSegment[], factor: 'a' | 'bt',
  shapeOk: (w: WeightMatrix) => boolean, expected: string): FlatSegments {
  const count = segments.length;
  const starts = new Int32Array(count);
  const ends = new Int32Array(count);
  const ranks = new Int32Array(count);
  const dtypes = new Int32Array(count);
  const weights: (Float32Array | Uint16Array)[] = [];
  let rows = 0;
  for (let s = 0; s < count; s++) {
    const segment = segments[s]!;
    const w = checkedFactor(op, segment, s, factor, shapeOk, () => expected);
    dtypes[s] = DTYPE_INDEX[w.dtype];
    starts[s] = segment.start;
    ends[s] = segment.end;
    ranks[s] = w.rows; // both factors are [R, ·]
    weights.push(w.data);
    rows = Math.max(rows, segment.end);
  }
  return { rows, starts, ends, ranks, dtypes, weights };
}

/** Checks every size and index attention will use (block ids included) against the arrays given. */
function validateAttention(args: AttentionArgs): void {
  const op = 'attention';
  const { seqs, heads, kvHeads, headDim, blockSize } = args;
  checkInteger(op, 'seqs', seqs, 0);
  checkInteger(op, 'heads', heads, 1);
  checkInteger(op, 'kvHeads', kvHeads, 1);
  checkInteger(op, 'headDim', headDim, 1);
  checkInteger(op, 'blockSize', blockSize, 1);
  if (heads % kvHeads !== 0) throw kernelError(op, `heads ${heads} is not a multiple of kvHeads ${kvHeads}`);
  for (const name of ['blockTableStart', 'qStart', 'qLen', 'ctxLen'] as const) checkLength(op, name, args[name], seqs);
  for (const name of ['blockTable', 'blockTableStart', 'qStart', 'qLen', 'ctxLen'] as const) checkNotShared(op, name, args[name]);
  const blockElements = blockSize * kvHeads * headDim;
  if (!Number.isSafeInteger(blockElements) || !Number.isSafeInteger(heads * headDim)) {
    throw kernelError(op, `blockSize · kvHeads · headDim = ${blockElements} is beyond exact integers`);
  }
  const numBlocks = Math.floor(Math.min(args.kCache.length, args.vCache.length) / blockElements);
  const rowElements = heads * headDim;
  for (let s = 0; s < seqs; s++) {
    const start = args.qStart[s]!;
    const count = args.qLen[s]!;
    const context = args.ctxLen[s]!;
    const table = args.blockTableStart[s]!;
    if (start < 0 || count < 0 || context < count || table < 0) {
      throw kernelError(op, `sequence ${s}: qStart ${start}, qLen ${count}, ctxLen ${context}, blockTableStart ${table} `
        + '(need qStart, blockTableStart >= 0 and 0 <= qLen <= ctxLen)');
    }
    checkLength(op, 'q', args.q, (start + count) * rowElements);
    checkLength(op, 'out', args.out, (start + count) * rowElements);
    const blocksUsed = Math.ceil(context / blockSize);
    checkLength(op, 'blockTable', args.blockTable, table + blocksUsed);
    for (let j = 0; j < blocksUsed; j++) {
      const block = args.blockTable[table + j]!;
      if (block < 0 || block >= numBlocks) {
        throw kernelError(op, `sequence ${s}: block id ${block} at blockTable[${table + j}] is outside the cache of ${numBlocks} blocks`,
          { limit: numBlocks });
      }
    }
  }
}
