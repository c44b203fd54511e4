/**
 * Loads the compiled addon (build/Release/soppu_native.node). The raw binding is typed loosely here;
 * native-kernel-set.ts wraps it in the KernelSet interface.
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeVariant {
  readonly index: number;
  readonly name: string;
  readonly supported: boolean;
}

/** The addon's exports. Every op takes the ISA variant index as its first argument. */
export interface NativeAddon {
  variants(): NativeVariant[];
  bestVariant(): number;
  numThreads(): number;
  [op: string]: unknown;
}

function findPackageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error('package.json not found above the kernels module');
    dir = parent;
  }
  return dir;
}

let cached: { addon: NativeAddon | null; error: string | null } | undefined;

/** The addon, or null with the reason when it is not built (the reference kernels still work). */
export function loadNativeAddon(): { addon: NativeAddon | null; error: string | null } {
  if (cached) return cached;
  try {
    const require = createRequire(import.meta.url);
    const addon = require(join(findPackageRoot(), 'build', 'Release', 'soppu_native.node')) as NativeAddon;
    cached = { addon, error: null };
  } catch (e) {
    cached = { addon: null, error: e instanceof Error ? e.message : String(e) };
  }
  return cached;
}
