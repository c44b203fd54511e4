/**
 * The forward pass calls this after every base linear y = x·Wᵀ of a targeted module, so the engine
 * can add each row's adapter delta (raw LoRA or compressed) in place. The model knows nothing about
 * adapters beyond this hook.
 */
export type TargetModule = 'q_proj' | 'k_proj' | 'v_proj' | 'o_proj' | 'gate_proj' | 'up_proj' | 'down_proj';

export const TARGET_MODULES: readonly TargetModule[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/**
 * y: [m, outFeatures] (already holds x·Wᵀ + bias), x: [m, inFeatures]. Adds ΔW rows in place.
 * Rows of the base model (adapter 0) must be left untouched.
 */
export type AdapterHook = (y: Float32Array, x: Float32Array, m: number, layer: number, module: TargetModule) => void;
