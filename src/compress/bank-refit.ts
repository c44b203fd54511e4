/**
 * `bank refit`: recompresses every adapter of a bank jointly with the bank's recorded options.
 *
 * Inputs (decided, documented in the CLI help): by default the bank's own reconstruction of each
 * adapter, which is always available and exact for raw slots (the usual reason to refit: adapters
 * added by projection and kept raw). Errors are then recorded as bounds (previous error + refit
 * error, errorBasis "bound"). With `fromSources`, the recorded source directories are loaded instead
 * (every one must still exist) and errors are measured against them again (errorBasis "source").
 */
import { resolve } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { loadLoraAdapter } from '../io/load-lora-adapter.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { adapterFromBank } from './bank-source.js';
import type { BankManifest } from './bank-manifest.js';
import { openBank } from './bank-reader.js';
import { withBankLock, writeBankLocked, type AdapterExtras } from './bank-writer.js';
import { compressAdapters } from './compress-adapters.js';

export interface RefitOptions {
  readonly fromSources?: boolean;
  readonly onProgress?: (done: number, total: number, label: string) => void;
}

export async function refitBank(dir: string, options: RefitOptions = {}): Promise<BankManifest> {
  return withBankLock(dir, async () => {
    const bank = await openBank(dir);
    const manifest = bank.manifest;
    if (manifest.adapters.length === 0) throw new SoppuError('CONFIG', `${dir}: the bank holds no adapters to refit`, { file: dir });
    const inputs: { id: string; adapter: LoraAdapter }[] = [];
    const extras = new Map<string, AdapterExtras>();
    const previousErrors = new Map<string, Record<string, number>>();
    const errorBasis = new Map<string, 'source' | 'bound'>();
    for (const entry of manifest.adapters) {
      let adapter: LoraAdapter;
      if (options.fromSources) {
        if (!entry.source) throw new SoppuError('FILE_NOT_FOUND', `adapter ${entry.id}: no source directory was recorded; refit from the bank instead`, { field: 'source' });
        adapter = await loadLoraAdapter(resolve(entry.source));
        errorBasis.set(entry.id, 'source');
      } else {
        adapter = await adapterFromBank(bank, entry.id);
        previousErrors.set(entry.id, Object.fromEntries(Object.entries(entry.perSlot).map(([path, p]) => [path, p.relativeError])));
        errorBasis.set(entry.id, 'bound');
      }
      inputs.push({ id: entry.id, adapter });
      const sourceRanks = options.fromSources
        ? new Map([...adapter.modules.values()].map((m) => [m.path, m.rank]))
        : new Map(Object.entries(entry.perSlot).flatMap(([path, p]) => (p.sourceRank !== undefined ? [[path, p.sourceRank] as const] : [])));
      extras.set(entry.id, { passthrough: options.fromSources ? adapter.passthrough : await bank.loadPassthrough(entry.id), config: entry.config, sourceRanks });
    }
    const recorded = manifest.options;
    const result = await compressAdapters(inputs, { ...recorded, method: manifest.method, clusters: Math.min(manifest.clusters, inputs.length), ...(options.onProgress ? { onProgress: options.onProgress } : {}) });
    const byId = new Map(manifest.adapters.map((a) => [a.id, a]));
    // keep what the bank knew about each adapter's origin (a reconstruction has none of it)
    const adapters = result.adapters.map((info) => {
      const entry = byId.get(info.id)!;
      const flags = [...new Set([...entry.flags, ...info.flags])];
      return { ...info, source: entry.source, baseModel: entry.baseModel, sourceDtype: entry.sourceDtype, flags, rawParameters: entry.rawParameters };
    });
    return writeBankLocked(dir, { ...result, adapters }, extras, { replace: true, addedBy: 'refit', errorBasis, previousErrors });
  });
}
