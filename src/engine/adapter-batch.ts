/**
 * Adapter batching: the AdapterHook of one forward step. Rows are ordered so that each adapter's
 * rows, and each cluster's compressed rows, are contiguous (see compareAdapters); per slot the hook
 * then gives the linear's part of a matmulGroup
 *   raw adapters:        one segment per adapter (A, (s·B)ᵀ)
 *   compressed adapters: ONE segment per cluster run with the shared bases (Vᵀ, Uᵀ), and each
 *                        row's own core Σ between shrink and expand
 * and no segment over base rows (adapter 0). Every row's delta depends only on that row's x and
 * its own adapter, so batch composition never changes a request's result.
 */
import type { KernelSet, LoraCore, LoraSegment } from '../kernels/kernel-set.js';
import type { AdapterHook, AdapterSlot } from '../model/adapter-hook.js';
import { slotKey, type ResidentAdapter } from './resident-adapter.js';

/**
 * Batch order of adapters: base first, then bank adapters by cluster, then by id; adapters served
 * raw from PEFT directories last, by id.
 */
export function compareAdapters(p: ResidentAdapter | null, q: ResidentAdapter | null): number {
  if (p === q) return 0;
  if (!p) return -1;
  if (!q) return 1;
  const clusterP = p.cluster < 0 ? Number.MAX_SAFE_INTEGER : p.cluster;
  const clusterQ = q.cluster < 0 ? Number.MAX_SAFE_INTEGER : q.cluster;
  if (clusterP !== clusterQ) return clusterP - clusterQ;
  return p.id < q.id ? -1 : p.id > q.id ? 1 : 0;
}

const EMPTY: AdapterSlot = { segments: [], cores: [] };

/** Segment statistics of the last step, for tests and benchmarks. */
export interface BatchSegmentCounts {
  rawSegments: number;
  sharedSegments: number;
  coreRows: number;
}

export class AdapterBatcher {
  // the last step's rows and plans: a decode step usually has the same rows as the one before, and
  // reusing its plans (and the kernels' checked form of them) saves rebuilding them per slot
  private lastRows: readonly (ResidentAdapter | null)[] = [];
  private lastPlans = new Map<string, AdapterSlot>();

  /**
   * `slotKeys`: every slot the forward pass will ask for (slotKey(layer, module)). Given, a step whose rows
   * changed builds all its plans at once, before the forward pass: built lazily, each plan came between two
   * linears that had evicted the rows' adapter objects from cache (scratch, f32 SmolLM-135M shapes, 32
   * compressed rows: the batcher's share of a composition change 1.35 → 0.95 ms).
   * `kernels` given too, a step that shares adapters with the last one (a request's prefill rows became one
   * decode row, a request left or arrived) carries the last plans over with kernels.loraRows instead: the
   * known adapters' work is not read again, and only an arriving adapter's is built (see carriedPlans).
   */
  constructor(private readonly slotKeys: readonly string[] = [], private readonly kernels?: Pick<KernelSet, 'loraRows'>) {}

  /**
   * The hook for a step whose row r belongs to `rowAdapters[r]` (null = base model). Returns null
   * when no row has an adapter, so the forward pass can skip the hook entirely.
   */
  hook(rowAdapters: readonly (ResidentAdapter | null)[], counts?: BatchSegmentCounts): AdapterHook | null {
    if (!rowAdapters.some((a) => a !== null)) {
      this.lastRows = []; // no step holds evicted adapters alive
      this.lastPlans = new Map();
      return null;
    }
    const m = rowAdapters.length;
    const same = m === this.lastRows.length && rowAdapters.every((adapter, r) => adapter === this.lastRows[r]);
    const reuse = same && !counts;
    // counted steps build every plan from the rows (the counts are of what building finds)
    const carried = reuse || counts ? null : this.carriedPlans(rowAdapters);
    const plans = reuse ? this.lastPlans : carried ?? new Map<string, AdapterSlot>();
    this.lastRows = rowAdapters.slice();
    this.lastPlans = plans;
    const planOf = (key: string): AdapterSlot => {
      let plan = plans.get(key);
      if (!plan) {
        const built = buildPlan(rowAdapters, key);
        plan = built.plan;
        plans.set(key, plan);
        if (counts) {
          counts.rawSegments += built.rawSegments;
          counts.sharedSegments += plan.segments.length - built.rawSegments;
          counts.coreRows += plan.cores.reduce((n, c) => n + (c ? 1 : 0), 0);
        }
      }
      return plan;
    };
    if (!reuse && !carried) for (const key of this.slotKeys) planOf(key);
    return (layer, module, rows) => {
      if (rows !== m) throw new RangeError(`adapter hook: step has ${m} rows, forward passed ${rows}`);
      const plan = planOf(slotKey(layer, module));
      return plan.segments.length === 0 ? null : plan;
    };
  }

  /**
   * Every slot's plan carried over from the last step's plans: row r takes the work of the last step's first
   * row of its adapter, and rows of adapters new to the batch (a request arrived) get theirs built from them
   * alone and joined in. Null when the last step did not build every slot's plan, or shared no adapter.
   */
  private carriedPlans(rowAdapters: readonly (ResidentAdapter | null)[]): Map<string, AdapterSlot> | null {
    if (!this.kernels || this.slotKeys.length === 0) return null;
    const firstRow = new Map<ResidentAdapter, number>();
    this.lastRows.forEach((adapter, r) => {
      if (adapter && !firstRow.has(adapter)) firstRow.set(adapter, r);
    });
    const rowOf = new Int32Array(rowAdapters.length);
    let known = 0;
    let arrived = false;
    // the rows of adapters new to the batch (the others as base rows): their work is built from them
    const newRows = rowAdapters.map((adapter, r) => {
      const last = adapter ? firstRow.get(adapter) : -1;
      rowOf[r] = last ?? -1;
      if (last === undefined) arrived = true;
      else if (last >= 0) known++;
      return last === undefined ? adapter : null;
    });
    if (known === 0) return null;
    const plans = new Map<string, AdapterSlot>();
    for (const key of this.slotKeys) {
      const last = this.lastPlans.get(key);
      if (!last) return null;
      const added = arrived ? buildPlan(newRows, key).plan : EMPTY;
      const carried = last.segments.length === 0 && added.segments.length === 0 ? EMPTY
        : this.kernels.loraRows(last.segments, last.cores, rowOf, added);
      plans.set(key, carried.segments.length === 0 ? EMPTY : carried);
    }
    return plans;
  }
}

function buildPlan(rowAdapters: readonly (ResidentAdapter | null)[], key: string): { plan: AdapterSlot; rawSegments: number } {
  const segments: LoraSegment[] = [];
  const cores: (LoraCore | undefined)[] = new Array<LoraCore | undefined>(rowAdapters.length);
  let rawSegments = 0;
  // a run is one adapter's A (raw, by identity) or one cluster's bases (compressed, by key); no
  // object per row: a composition change rebuilds every slot's plan, rows × slots of them
  let runOperand: object | string | null = null;
  let runStart = 0;
  let runA: LoraSegment['a'] = undefined;
  let runBt: LoraSegment['bt'] = undefined;
  const close = (end: number): void => {
    if (runOperand === null) return;
    segments.push({ start: runStart, end, a: runA, bt: runBt });
    if (typeof runOperand !== 'string') rawSegments++;
    runOperand = null;
  };
  for (let r = 0; r < rowAdapters.length; r++) {
    const slot = rowAdapters[r]?.slots.get(key);
    if (!slot) {
      close(r);
      continue;
    }
    const operand = slot.kind === 'raw' ? slot.a : slot.bases.key;
    if (operand !== runOperand) {
      close(r);
      runOperand = operand;
      runStart = r;
      runA = slot.kind === 'raw' ? slot.a : slot.bases.a;
      runBt = slot.kind === 'raw' ? slot.bt : slot.bases.bt;
    }
    if (slot.kind === 'compressed') cores[r] = slot.core;
  }
  close(rowAdapters.length);
  return { plan: segments.length === 0 ? EMPTY : { segments, cores }, rawSegments };
}
