/**
 * Canonical in-memory form of a PEFT LoRA adapter, shared by io, compress and engine.
 * Factors are widened to f32 on load (adapters are small); the source dtype is recorded.
 */
import type { StDtype } from '../tensor/dtype.js';

/** One adapted linear layer: ΔW = scale · B · A. */
export interface LoraModule {
  /** Canonical module path, prefixes and adapter names stripped: "model.layers.3.self_attn.q_proj". */
  readonly path: string;
  /** Layer index parsed from the path, or -1 when the path has none. */
  readonly layer: number;
  /** Last path component: "q_proj", "down_proj", "c_attn", … */
  readonly module: string;
  readonly rank: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** alpha / r, or alpha / √r with rsLoRA; per-module patterns applied. */
  readonly scale: number;
  readonly alpha: number;
  /** A: [rank, inFeatures] row-major f32 (Conv1D layouts already transposed to this). */
  readonly a: Float32Array;
  /** B: [outFeatures, rank] row-major f32, NOT scaled. */
  readonly b: Float32Array;
}

/** A tensor passed through untouched (modules_to_save heads, biases). */
export interface PassthroughTensor {
  readonly name: string;
  readonly dtype: StDtype;
  readonly shape: readonly number[];
  readonly bytes: Uint8Array;
}

/** Subset of adapter_config.json that SOPPU honours, normalised. */
export interface LoraConfig {
  readonly peftType: 'LORA';
  readonly r: number;
  readonly loraAlpha: number;
  readonly useRslora: boolean;
  readonly targetModules: readonly string[] | string;
  /** exclude_modules: names (equal or dotted suffix) or a regex; absent or null: none. */
  readonly excludeModules?: readonly string[] | string | null;
  readonly rankPattern: Readonly<Record<string, number>>;
  readonly alphaPattern: Readonly<Record<string, number>>;
  readonly fanInFanOut: boolean;
  readonly layersToTransform: readonly number[] | null;
  /** layers_pattern: regexes naming the layer list ("layers", "h"); absent or null: any component. */
  readonly layersPattern?: readonly string[] | null;
  readonly modulesToSave: readonly string[] | null;
  readonly bias: string;
  readonly baseModelNameOrPath: string | null;
  /** The original JSON, kept so a save can round-trip unknown fields. */
  readonly raw: Readonly<Record<string, unknown>>;
}

export type AdapterFlag = 'all-zero' | 'zero-modules' | 'fan-in-fan-out-mismatch' | 'doubled-prefix' | 'adapter-name-in-keys' | 'non-finite';

export interface LoraAdapter {
  /** Directory the adapter came from (or '' when built in memory). */
  readonly source: string;
  readonly config: LoraConfig;
  /** Keyed by canonical module path, in a deterministic (sorted) order. */
  readonly modules: ReadonlyMap<string, LoraModule>;
  readonly passthrough: readonly PassthroughTensor[];
  /** dtype of the factors in the file. */
  readonly sourceDtype: StDtype;
  readonly flags: readonly AdapterFlag[];
}
