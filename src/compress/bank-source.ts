/**
 * Where a bank's adapters come from and go back to: loading adapter directories with ids (directory
 * names by default, duplicates refused), and turning a bank's reconstruction back into a LoraAdapter.
 */
import { basename, resolve } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { loadLoraAdapter } from '../io/load-lora-adapter.js';
import type { LoraAdapter, LoraConfig, LoraModule } from '../io/lora-types.js';
import { checkAdapterId, compareStrings } from './bank-manifest.js';
import { reconstructAdapter, type Bank } from './bank-reader.js';

/** An adapter argument: "dir" (id = directory name) or "id=dir". */
export function parseAdapterArgument(argument: string): { id: string; dir: string } {
  const eq = argument.indexOf('=');
  if (eq > 0 && !argument.slice(0, eq).includes('/')) return { id: argument.slice(0, eq), dir: argument.slice(eq + 1) };
  return { id: basename(resolve(argument)), dir: argument };
}

/** Loads adapter directories with their ids; refuses duplicate ids naming both directories. */
export async function loadAdapterArguments(argumentsList: readonly string[]): Promise<{ id: string; adapter: LoraAdapter }[]> {
  const seen = new Map<string, string>();
  const parsed = argumentsList.map(parseAdapterArgument);
  for (const { id, dir } of parsed) {
    checkAdapterId(id);
    const other = seen.get(id);
    if (other !== undefined) {
      throw new SoppuError('CONFIG', `adapter id "${id}" is given twice (${other} and ${dir}); name them with id=dir`, { field: 'id' });
    }
    seen.set(id, dir);
  }
  const out: { id: string; adapter: LoraAdapter }[] = [];
  for (const { id, dir } of parsed) out.push({ id, adapter: await loadLoraAdapter(resolve(dir)) });
  return out;
}

/** The adapter_config.json object to keep in the manifest (null for adapters built in memory). */
export function adapterConfigJsonOrNull(adapter: LoraAdapter): Record<string, unknown> | null {
  return Object.keys(adapter.config.raw).length > 0 ? { ...adapter.config.raw } : null;
}

/**
 * The bank's reconstruction of `id` as a LoraAdapter with scale 1 per module (alpha = rank):
 * compressed slots B = U·Σ, A = Vᵀ; raw slots as stored; zero slots as rank-1 zero factors (so a
 * refit sees, and flags, them again). Passthrough tensors and the recorded config come along.
 */
export async function adapterFromBank(bank: Bank, id: string): Promise<LoraAdapter> {
  const entry = bank.adapter(id);
  const slots = await reconstructAdapter(bank, id);
  const modules = new Map<string, LoraModule>();
  for (const path of Object.keys(entry.perSlot).sort(compareStrings)) {
    const slot = bank.slot(path);
    const part = slots.get(path);
    const rank = part?.rank ?? 1;
    const match = /\.(\d+)\./.exec(path);
    modules.set(path, {
      path, layer: match ? Number(match[1]) : -1, module: path.split('.').pop()!, rank,
      inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, scale: 1, alpha: rank,
      a: part?.a ?? new Float32Array(slot.inFeatures), b: part?.b ?? new Float32Array(slot.outFeatures),
    });
  }
  const raw = entry.config ?? {};
  const modulesToSave = Array.isArray(raw.modules_to_save) ? (raw.modules_to_save as unknown[]).filter((m): m is string => typeof m === 'string') : null;
  const config: LoraConfig = {
    peftType: 'LORA', r: modules.values().next().value?.rank ?? 1, loraAlpha: modules.values().next().value?.rank ?? 1,
    useRslora: false, targetModules: [...new Set([...modules.values()].map((m) => m.module))].sort(),
    rankPattern: {}, alphaPattern: {}, fanInFanOut: false, layersToTransform: null, modulesToSave,
    bias: typeof raw.bias === 'string' ? raw.bias : 'none', baseModelNameOrPath: entry.baseModel ?? bank.manifest.baseModel,
    raw: withoutLoraKeys(raw),
  };
  return { source: entry.source, config, modules, passthrough: await bank.loadPassthrough(id), sourceDtype: 'F32', flags: [] };
}

/** The recorded config minus every key the export recomputes (ranks, alphas, targets, layout flags). */
function withoutLoraKeys(raw: Readonly<Record<string, unknown>>): Record<string, unknown> {
  const drop = new Set(['r', 'lora_alpha', 'rank_pattern', 'alpha_pattern', 'target_modules', 'use_rslora', 'use_dora', 'fan_in_fan_out', 'layers_to_transform', 'layers_pattern', 'peft_type', 'exclude_modules', 'init_lora_weights']);
  return Object.fromEntries(Object.entries(raw).filter(([k]) => !drop.has(k)));
}
