/**
 * Adapter batching: the AdapterHook of one forward step. Rows are ordered so that each adapter's
 * rows, and each cluster's compressed rows, are contiguous (see compareAdapters); per slot the hook
 * then runs
 *   raw adapters:        one loraShrink / loraExpand segment per adapter (A, (s·B)ᵀ)
 *   compressed adapters: ONE shared shrink per cluster segment (Vᵀ), a per-row loraCore (Σ),
 *                        ONE shared expand per cluster segment (Uᵀ)
 * and leaves base rows (adapter 0) untouched. Every row's delta depends only on that row's x and
 * its own adapter, so batch composition never changes a request's result.
 */
import type { KernelSet, LoraCore, LoraSegment } from '../kernels/kernel-set.js';
import type { AdapterHook, TargetModule } from '../model/adapter-hook.js';
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

/** What one slot does in one step. */
interface SlotPlan {
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** Columns of the rank scratch (max rank over the segments). */
  readonly stride: number;
  /** Raw and shared-compressed shrink segments. */
  readonly shrink: LoraSegment[];
  readonly rawExpand: LoraSegment[];
  readonly sharedExpand: LoraSegment[];
  /** Per row: the compressed core, or undefined. */
  readonly cores: (LoraCore | undefined)[];
}

const EMPTY: SlotPlan = { inFeatures: 0, outFeatures: 0, stride: 0, shrink: [], rawExpand: [], sharedExpand: [], cores: [] };

/** Segment statistics of the last step, for tests and benchmarks. */
export interface BatchSegmentCounts {
  rawSegments: number;
  sharedSegments: number;
  coreRows: number;
}

export class AdapterBatcher {
  private readonly kernels: KernelSet;
  private shrinkScratch = new Float32Array(0);
  private coreScratch = new Float32Array(0);

  constructor(kernels: KernelSet) {
    this.kernels = kernels;
  }

  /**
   * The hook for a step whose row r belongs to `rowAdapters[r]` (null = base model). Returns null
   * when no row has an adapter, so the forward pass can skip the hook entirely.
   */
  hook(rowAdapters: readonly (ResidentAdapter | null)[], counts?: BatchSegmentCounts): AdapterHook | null {
    if (!rowAdapters.some((a) => a !== null)) return null;
    const plans = new Map<string, SlotPlan>();
    const m = rowAdapters.length;
    return (y: Float32Array, x: Float32Array, rows: number, layer: number, module: TargetModule): void => {
      if (rows !== m) throw new RangeError(`adapter hook: step has ${m} rows, forward passed ${rows}`);
      const key = slotKey(layer, module);
      let plan = plans.get(key);
      if (!plan) {
        plan = buildPlan(rowAdapters, key);
        plans.set(key, plan);
        if (counts) {
          counts.rawSegments += plan.rawExpand.length;
          counts.sharedSegments += plan.sharedExpand.length;
          counts.coreRows += plan.cores.reduce((n, c) => n + (c ? 1 : 0), 0);
        }
      }
      if (plan.shrink.length === 0) return;
      const size = m * plan.stride;
      if (this.shrinkScratch.length < size) this.shrinkScratch = new Float32Array(size);
      // t: [M, stride]
      const t = this.shrinkScratch;
      this.kernels.loraShrink(t, plan.stride, x, plan.inFeatures, plan.shrink);
      if (plan.rawExpand.length > 0) this.kernels.loraExpand(y, plan.outFeatures, t, plan.stride, plan.rawExpand);
      if (plan.sharedExpand.length > 0) {
        if (this.coreScratch.length < size) this.coreScratch = new Float32Array(size);
        // core: [M, stride] = Σ · t per compressed row
        const core = this.coreScratch;
        this.kernels.loraCore(core, t, plan.stride, m, plan.cores);
        this.kernels.loraExpand(y, plan.outFeatures, core, plan.stride, plan.sharedExpand);
      }
    };
  }
}

function buildPlan(rowAdapters: readonly (ResidentAdapter | null)[], key: string): SlotPlan {
  const shrink: LoraSegment[] = [];
  const rawExpand: LoraSegment[] = [];
  const sharedExpand: LoraSegment[] = [];
  const cores: (LoraCore | undefined)[] = new Array<LoraCore | undefined>(rowAdapters.length);
  let inFeatures = 0;
  let outFeatures = 0;
  let stride = 0;
  // a run is one adapter's A (raw, by identity) or one cluster's bases (compressed, by key)
  let runOperand: object | string | null = null;
  let runStart = 0;
  let runKind: 'raw' | 'compressed' = 'raw';
  let runSegment: { a: LoraSegment['a']; bt: LoraSegment['bt'] } | null = null;
  const close = (end: number): void => {
    if (!runSegment || runOperand === null) return;
    const segment: LoraSegment = { start: runStart, end, a: runSegment.a, bt: runSegment.bt };
    shrink.push(segment);
    (runKind === 'raw' ? rawExpand : sharedExpand).push(segment);
    runOperand = null;
    runSegment = null;
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
      runKind = slot.kind;
      runSegment = slot.kind === 'raw' ? { a: slot.a, bt: slot.bt } : { a: slot.bases.a, bt: slot.bases.bt };
    }
    if (slot.kind === 'compressed') cores[r] = slot.core;
    const a = slot.kind === 'raw' ? slot.a : slot.bases.a;
    const bt = slot.kind === 'raw' ? slot.bt : slot.bases.bt;
    inFeatures = a.cols;
    outFeatures = bt.cols;
    stride = Math.max(stride, slot.rank);
  }
  close(rowAdapters.length);
  if (shrink.length === 0) return EMPTY;
  return { inFeatures, outFeatures, stride, shrink, rawExpand, sharedExpand, cores };
}
