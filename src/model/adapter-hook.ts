import type { LoraCore, LoraSegment } from '../kernels/kernel-set.js';

/**
 * The forward pass asks the hook, before every targeted linear y = x·Wᵀ of a step, for the rows' adapter
 * work on that linear. The linears that read one input (q, k and v; o; gate and up; down) run as one
 * kernels.matmulGroup call, each part with its slot's work (the base product and every row's delta, raw
 * LoRA or compressed) or, given null, the base product alone. Adapters are data the kernels index, never
 * code in the model: the model knows nothing about them beyond this.
 */
export type TargetModule = 'q_proj' | 'k_proj' | 'v_proj' | 'o_proj' | 'gate_proj' | 'up_proj' | 'down_proj';

export const TARGET_MODULES: readonly TargetModule[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/** One linear's adapter work in one step, in the KernelSet's loraApply/matmulLora/matmulGroup form. */
export interface AdapterSlot {
  /** Row runs sharing one shrink/expand pair (a raw adapter, or a cluster's shared bases). */
  readonly segments: readonly LoraSegment[];
  /** Per row: the compressed core, or undefined. */
  readonly cores: readonly (LoraCore | undefined)[];
}

/**
 * The adapter work of one linear of a step with `rows` token rows, or null when no row has an adapter
 * on it. Rows outside every segment (the base model, adapter 0) get x·Wᵀ alone.
 */
export type AdapterHook = (layer: number, module: TargetModule, rows: number) => AdapterSlot | null;
