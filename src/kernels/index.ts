/**
 * Kernel selection: the best native variant this CPU supports (or SOPPU_KERNEL_VARIANT), else the
 * TypeScript reference. `SOPPU_KERNELS=ref` forces the reference everywhere.
 */
import type { KernelSet } from './kernel-set.js';
import { loadNativeAddon } from './native-addon.js';
import { nativeKernelSet } from './native-kernel-set.js';
import { refKernels } from './ref/index.js';

export type { KernelSet, LoraSegment, LoraCore, LoraRows, AttentionArgs } from './kernel-set.js';
export { refKernels } from './ref/index.js';

let chosen: KernelSet | undefined;

/** The kernel set to use for real work. */
export function getKernels(): KernelSet {
  if (chosen) return chosen;
  const { addon } = loadNativeAddon();
  chosen = process.env.SOPPU_KERNELS === 'ref' || !addon ? refKernels : nativeKernelSet(addon.bestVariant());
  return chosen;
}

/** Every native variant this CPU supports, by name (tests check each against the reference). */
export function supportedNativeKernelSets(): KernelSet[] {
  const { addon } = loadNativeAddon();
  if (!addon) return [];
  return addon.variants().filter((v) => v.supported).map((v) => nativeKernelSet(v.index));
}

export interface KernelDescription {
  chosen: string;
  variants: { name: string; supported: boolean }[];
  threads: number;
  nativeError: string | null;
}

/** What `soppu info` prints. */
export function describeKernels(): KernelDescription {
  const { addon, error } = loadNativeAddon();
  return {
    chosen: getKernels().name,
    variants: addon ? addon.variants().map((v) => ({ name: v.name, supported: v.supported })) : [],
    threads: addon ? addon.numThreads() : 1,
    nativeError: error,
  };
}
