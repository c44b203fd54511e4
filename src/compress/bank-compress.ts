/**
 * `soppu compress`: loads adapter directories, compresses them jointly and writes a bank.
 */
import type { LoraAdapter } from '../io/lora-types.js';
import { adapterConfigJsonOrNull, loadAdapterArguments } from './bank-source.js';
import type { BankManifest } from './bank-manifest.js';
import { checkNewBankOutput, writeBank, type AdapterExtras } from './bank-writer.js';
import { compressAdapters } from './compress-adapters.js';
import type { CompressOptions } from './compression-types.js';
import { SoppuError } from '../errors/soppu-error.js';

export interface CompressToBankOptions {
  readonly compress: CompressOptions;
  /** Replace an existing bank at the output. */
  readonly replace?: boolean;
  /** Take adapters whose base_model_name_or_path differ (the same model under other names). */
  readonly ignoreBaseModel?: boolean;
}

/** Per-adapter extras (passthrough tensors, config, source ranks) for the bank writer. */
export function extrasOf(inputs: readonly { id: string; adapter: LoraAdapter }[]): Map<string, AdapterExtras> {
  return new Map(inputs.map(({ id, adapter }) => [id, {
    passthrough: adapter.passthrough,
    config: adapterConfigJsonOrNull(adapter),
    sourceRanks: new Map([...adapter.modules.values()].map((m) => [m.path, m.rank])),
  }]));
}

/** Compresses already-loaded adapters into a new bank at `out`. */
export async function compressIntoBank(inputs: readonly { id: string; adapter: LoraAdapter }[], out: string, options: CompressToBankOptions): Promise<BankManifest> {
  if (inputs.length === 0) throw new SoppuError('CONFIG', 'no adapters to compress', { field: 'adapters' });
  await checkNewBankOutput(out, options.replace ?? false); // before the compression, which can take minutes
  const result = await compressAdapters(inputs, options.compress, { ignoreBaseModel: options.ignoreBaseModel ?? false });
  return writeBank(out, result, extrasOf(inputs), { replace: options.replace ?? false, addedBy: 'compress' });
}

/** Loads adapter arguments ("dir" or "id=dir") and compresses them into a bank at `out`. */
export async function compressDirectoriesToBank(adapterArguments: readonly string[], out: string, options: CompressToBankOptions): Promise<BankManifest> {
  await checkNewBankOutput(out, options.replace ?? false); // before loading every adapter
  return compressIntoBank(await loadAdapterArguments(adapterArguments), out, options);
}
