/**
 * `bank refit`: recompresses every adapter of a bank jointly with the bank's recorded options.
 *
 * Where each adapter's input comes from (decided per adapter, mode 'auto' by default):
 *  - its recorded source directory, when adapter_model.safetensors is still there with the sha256
 *    recorded when it entered the bank and adapter_config.json still reads as recorded (it sets every
 *    module's scale): errors are then measured against the original again (errorBasis "source");
 *  - otherwise the bank's own reconstruction (always available; exact for slots kept raw). Errors are
 *    then recorded as bounds, previous error + refit error (errorBasis "bound"): refitting a lossy
 *    reconstruction compounds its error, which is why an unchanged source is preferred.
 * Mode 'sources' requires every source (fails naming the first missing or changed one); mode 'bank'
 * uses the reconstruction for all.
 */
import { resolve } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { loadLoraAdapter } from '../io/load-lora-adapter.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { adapterConfigJsonOrNull, adapterFromBank } from './bank-source.js';
import { compareStrings, type BankManifest, type ManifestAdapter } from './bank-manifest.js';
import { openBank } from './bank-reader.js';
import { withBankLock } from './bank-lock.js';
import { sourceWeightsSha256, writeBankLocked, type AdapterExtras } from './bank-writer.js';
import { compressAdapters } from './compress-adapters.js';

export type RefitInput = 'auto' | 'sources' | 'bank';

export interface RefitOptions {
  readonly from?: RefitInput;
  readonly onProgress?: (done: number, total: number, label: string) => void;
}

export interface RefitResult {
  readonly manifest: BankManifest;
  /** Adapters refitted from their unchanged source, and from the bank's reconstruction. */
  readonly fromSource: readonly string[];
  readonly fromBank: readonly string[];
}

/** JSON text with object keys sorted, so two parses of one config compare equal whatever their key order. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v !== null && typeof v === 'object' && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort(([p], [q]) => compareStrings(p, q))) : v);
}

/**
 * The recorded source of `entry` when it is as it entered the bank (weights with the recorded sha256 and the
 * recorded adapter_config.json, which sets every module's scale), or why it cannot be used.
 */
async function unchangedSource(entry: ManifestAdapter): Promise<{ adapter: LoraAdapter } | { problem: string }> {
  if (!entry.source) return { problem: 'no source directory was recorded' };
  if (!entry.sourceSha256) return { problem: 'no checksum of the source was recorded' };
  const sha = await sourceWeightsSha256(resolve(entry.source));
  if (sha === null) return { problem: `${entry.source}/adapter_model.safetensors is missing` };
  if (sha !== entry.sourceSha256) return { problem: `${entry.source}/adapter_model.safetensors changed since it entered the bank` };
  let adapter: LoraAdapter;
  try {
    adapter = await loadLoraAdapter(resolve(entry.source));
  } catch (e) {
    return { problem: `${entry.source} could not be read: ${e instanceof Error ? e.message : String(e)}` };
  }
  if (entry.config !== null && canonicalJson(adapterConfigJsonOrNull(adapter)) !== canonicalJson(entry.config)) {
    return { problem: `${entry.source}/adapter_config.json changed since it entered the bank` };
  }
  return { adapter };
}

export async function refitBank(dir: string, options: RefitOptions = {}): Promise<RefitResult> {
  const mode = options.from ?? 'auto';
  return withBankLock(dir, async () => {
    const bank = await openBank(dir);
    const manifest = bank.manifest;
    if (manifest.adapters.length === 0) throw new SoppuError('CONFIG', `${dir}: the bank holds no adapters to refit`, { file: dir });
    const inputs: { id: string; adapter: LoraAdapter }[] = [];
    const extras = new Map<string, AdapterExtras>();
    const previousErrors = new Map<string, Record<string, number>>();
    const errorBasis = new Map<string, 'source' | 'bound'>();
    const fromSource: string[] = [];
    const fromBank: string[] = [];
    for (const entry of manifest.adapters) {
      const source = mode === 'bank' ? { problem: 'refit from the bank was asked for' } : await unchangedSource(entry);
      const problem = 'problem' in source ? source.problem : null;
      if (problem !== null && mode === 'sources') {
        throw new SoppuError('FILE_NOT_FOUND', `adapter ${entry.id}: cannot refit from its source: ${problem}`, { file: entry.source, field: 'source' });
      }
      let adapter: LoraAdapter;
      if ('adapter' in source) {
        adapter = source.adapter;
        errorBasis.set(entry.id, 'source');
        fromSource.push(entry.id);
      } else {
        adapter = await adapterFromBank(bank, entry.id);
        previousErrors.set(entry.id, Object.fromEntries(Object.entries(entry.perSlot).map(([path, p]) => [path, p.relativeError])));
        errorBasis.set(entry.id, 'bound');
        fromBank.push(entry.id);
      }
      const spentError = previousErrors.get(entry.id);
      inputs.push({ id: entry.id, adapter, ...(spentError ? { spentError } : {}) });
      const sourceRanks = problem === null
        ? new Map([...adapter.modules.values()].map((m) => [m.path, m.rank]))
        : new Map(Object.entries(entry.perSlot).flatMap(([path, p]) => (p.sourceRank !== undefined ? [[path, p.sourceRank] as const] : [])));
      extras.set(entry.id, { passthrough: problem === null ? adapter.passthrough : await bank.loadPassthrough(entry.id), config: entry.config, sourceRanks });
    }
    // the cluster count asked for (the bank's options; its clusters are what it has now): a refit of fewer adapters
    // than that fits fewer clusters, and one after adapters come back fits the asked count again
    const asked = manifest.options.clusters ?? manifest.clusters;
    // the bank took its adapters already (some perhaps with --ignore-base-model): their names are not checked again
    const fitted = await compressAdapters(inputs, { ...manifest.options, method: manifest.method, clusters: Math.min(asked, inputs.length), ...(options.onProgress ? { onProgress: options.onProgress } : {}) }, { ignoreBaseModel: true });
    const result = { ...fitted, options: { ...fitted.options, clusters: asked } };
    const byId = new Map(manifest.adapters.map((a) => [a.id, a]));
    // keep what the bank knew about each adapter's origin (a reconstruction has none of it)
    const adapters = result.adapters.map((info) => {
      const entry = byId.get(info.id)!;
      const flags = [...new Set([...entry.flags, ...info.flags])];
      return { ...info, source: entry.source, baseModel: entry.baseModel, sourceDtype: entry.sourceDtype, flags, rawParameters: entry.rawParameters };
    });
    // every adapter keeps its recorded checksum: a reconstruction's source was not read, and an unchanged
    // source's weights were just hashed against it (hashed again by the writer, each was read three times)
    const keepHashes = new Map(manifest.adapters.map((a) => [a.id, a.sourceSha256 ?? null]));
    const written = await writeBankLocked(dir, { ...result, adapters }, extras, { replace: true, addedBy: 'refit', errorBasis, previousErrors, sourceSha256: keepHashes, baseModel: manifest.baseModel });
    return { manifest: written, fromSource, fromBank };
  });
}
