/**
 * In-memory result of jointly compressing a set of adapters (src/compress/compress-adapters.ts),
 * written to disk by the bank writer (src/compress/bank-*.ts). The method code produces it; the
 * bank code stores and reads it.
 */

export type JdMethod = 'jd-full' | 'jd-diag';

export interface CompressOptions {
  readonly method: JdMethod;
  /** Fixed shared rank R per slot (upper bound when maxError is also set). */
  readonly rank?: number;
  /** Error budget: smallest R per slot and cluster with every adapter's relative error ≤ maxError. */
  readonly maxError?: number;
  /** Number of clusters (default 1). */
  readonly clusters?: number;
  /** Per-adapter weighting; default chosen by measurement, see docs/compression.md. */
  readonly weighting?: 'unit-norm' | 'none';
  /** Relative-improvement tolerance that stops alternating sweeps. */
  readonly tolerance?: number;
  readonly maxSweeps?: number;
  readonly seed?: number;
  /** Called with (done, total, label) as slots finish (progress bars). */
  readonly onProgress?: (done: number, total: number, label: string) => void;
}

/** Shared bases of one cluster for one slot. ΔWᵢ ≈ U · Σᵢ · Vᵀ. */
export interface SlotBases {
  readonly rank: number;
  /** U: [outFeatures, rank] row-major f32 */
  readonly u: Float32Array;
  /** Vᵀ: [rank, inFeatures] row-major f32 */
  readonly vt: Float32Array;
}

/** How one adapter's slot is stored. */
export type AdapterSlotResult =
  | {
      readonly storage: 'compressed';
      /** [rank, rank] (jd-full) or [rank] (jd-diag), scale folded in. */
      readonly core: Float32Array;
      readonly relativeError: number;
    }
  | {
      /** Kept exact: compression would cost more than the raw LoRA, or missed the budget. */
      readonly storage: 'raw';
      readonly rank: number;
      /** A: [rank, in] f32 */
      readonly a: Float32Array;
      /** B: [out, rank] f32, scale folded in */
      readonly b: Float32Array;
      readonly relativeError: 0;
      readonly reason: 'cheaper-raw' | 'over-budget' | 'projection-over-budget';
    }
  | {
      /** ΔW = 0 (e.g. untrained B): stored as nothing, flagged, error reported as 0. */
      readonly storage: 'zero';
      readonly relativeError: 0;
    };

export interface SlotResult {
  /** Canonical module path, e.g. "model.layers.3.self_attn.q_proj". */
  readonly path: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly method: JdMethod;
  /** Bases per cluster index; a cluster with no compressed member in this slot has null. */
  readonly bases: readonly (SlotBases | null)[];
  /** Per adapter id that has this slot. */
  readonly adapters: ReadonlyMap<string, AdapterSlotResult>;
  /** Sweeps run and final objective, for reports. */
  readonly sweeps: number;
  /** Relative error vs rank, per cluster, when rank was searched (for the report's curves). */
  readonly errorByRank?: readonly { cluster: number; rank: number; maxError: number; meanError: number }[];
}

export interface AdapterInfo {
  readonly id: string;
  readonly source: string;
  readonly cluster: number;
  readonly baseModel: string | null;
  readonly sourceDtype: string;
  readonly flags: readonly string[];
  /** Original raw LoRA parameter count (all slots). */
  readonly rawParameters: number;
}

export interface CompressionResult {
  readonly method: JdMethod;
  readonly clusters: number;
  readonly adapters: readonly AdapterInfo[];
  /** Sorted by path. */
  readonly slots: readonly SlotResult[];
  readonly options: Omit<CompressOptions, 'onProgress'>;
}
