/**
 * KernelSet over the native addon for one ISA variant. Ops the addon does not export yet fall back
 * to the reference, so the set is always complete; `nativeOps` lists which are native.
 */
import type { KernelSet } from './kernel-set.js';
import { loadNativeAddon } from './native-addon.js';
import { nativeCoreOps } from './native-core-ops.js';
import { nativeOps } from './native-ops.js';
import { refKernels } from './ref/index.js';
import { matmulGroupOf } from './ref/lora.js';

const cache = new Map<number, KernelSet>();

export function nativeKernelSet(variantIndex: number): KernelSet {
  const hit = cache.get(variantIndex);
  if (hit) return hit;
  const { addon } = loadNativeAddon();
  if (!addon) throw new Error('native addon is not built');
  const variant = addon.variants()[variantIndex];
  if (!variant?.supported) throw new Error(`native variant ${variantIndex} is not supported on this CPU`);
  const set: KernelSet = { ...refKernels, name: `native-${variant.name}` };
  Object.assign(set, nativeCoreOps(addon, variantIndex)); // matmul, gemmF32, gemmF64
  const ops = nativeOps(addon, variantIndex); // element-wise, attention, LoRA segment ops
  Object.assign(set, ops);
  // an addon without the fused op still runs it natively, as its two halves
  if (!ops.matmulLora) {
    set.matmulLora = (y, x, w, m, segments, cores) => {
      set.matmul(y, x, w, m);
      set.loraApply(y, w.rows, x, w.cols, segments, cores);
    };
  }
  if (!ops.matmulGroup) set.matmulGroup = matmulGroupOf(set); // its parts one by one, on this set's ops
  cache.set(variantIndex, set);
  return set;
}
