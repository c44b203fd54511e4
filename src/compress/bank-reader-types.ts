/**
 * What the engine needs from a bank: one adapter's parts, and a cluster's shared bases, each loaded
 * on demand. Implemented by the bank reader (src/compress); consumed by the engine's adapter cache.
 */

/** One slot of one adapter, as stored in the bank. */
export type BankSlotPart =
  | {
      readonly kind: 'raw';
      readonly path: string;
      readonly rank: number;
      readonly inFeatures: number;
      readonly outFeatures: number;
      /** A: [rank, in] f32 */
      readonly a: Float32Array;
      /** B: [out, rank] f32 with the adapter's scale folded in */
      readonly b: Float32Array;
    }
  | {
      readonly kind: 'compressed';
      readonly path: string;
      /** Identifies the shared bases (cluster × slot) this core multiplies; pass to loadBases. */
      readonly basesKey: string;
      readonly rank: number;
      readonly diagonal: boolean;
      /** [rank, rank] (full) or [rank] (diagonal) f32, with the adapter's scale folded in: ΔW = U · Σ · Vᵀ */
      readonly core: Float32Array;
    };

export interface BankAdapterParts {
  readonly id: string;
  readonly cluster: number;
  /** Keyed by canonical module path ("model.layers.3.self_attn.q_proj"). Zero slots are omitted. */
  readonly slots: ReadonlyMap<string, BankSlotPart>;
  /** Bytes these parts occupy in memory (cores and raw factors; bases not included). */
  readonly bytes: number;
  /**
   * Original names of the adapter's passthrough (non-LoRA) tensors — modules_to_save heads, biases —
   * kept for export; the engine refuses to serve an adapter that has any. Absent: none.
   */
  readonly passthrough?: readonly string[];
}

export interface SharedBases {
  readonly key: string;
  readonly path: string;
  readonly rank: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** U: [out, rank] f32, row-major */
  readonly u: Float32Array;
  /** Vᵀ: [rank, in] f32, row-major */
  readonly vt: Float32Array;
  readonly bytes: number;
}

export interface BankReader {
  readonly dir: string;
  readonly baseModel: string | null;
  /** Adapter ids in the bank, sorted. */
  ids(): readonly string[];
  has(id: string): boolean;
  /** Reads only this adapter's cores and raw slots; throws SoppuError(ADAPTER_NOT_FOUND | BANK_CORRUPT). */
  loadAdapter(id: string): Promise<BankAdapterParts>;
  /** Reads one cluster × slot pair of shared bases. */
  loadBases(key: string): Promise<SharedBases>;
  /** What `id`'s weights are in this version of the bank (equal in two versions: equal weights); null when absent. */
  fingerprint?(id: string): string | null;
  /** The shared bases `id` multiplies (its compressed slots'), with their element counts, before loading any. */
  basesOf?(id: string): readonly { readonly key: string; readonly elements: number }[];
  /** Whether any of `id`'s slots is compressed (basesOf would list bases), without building that list. */
  hasCompressedSlots?(id: string): boolean;
  /** The linear layers the bank's adapters adapt, with their shapes (to check a bank against a model up front). */
  readonly slotShapes?: readonly { readonly path: string; readonly inFeatures: number; readonly outFeatures: number }[];
}
