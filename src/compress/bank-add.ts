/**
 * `bank add`: projects one new adapter onto an existing bank's bases (no refit), writes its file and
 * switches the manifest. Slots the projection cannot serve within the bank's error budget (or that
 * the bank lacks) are kept raw, and the manifest records that a refit is advised.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { adapterConfigJsonOrNull } from './bank-source.js';
import { basesKeyOf, checkAdapterId, type BankManifest, type ManifestAdapter, type ManifestAdapterSlot, type ManifestSlot } from './bank-manifest.js';
import { openBank } from './bank-reader.js';
import { manifestWithout } from './bank-remove.js';
import { withBankLock } from './bank-lock.js';
import { adapterTensors, commitManifest, manifestSlotEntry, refitReasonsOf, sourceWeightsSha256, writeAdapterFile } from './bank-writer.js';
import type { AdapterSlotResult, SlotBases } from './compression-types.js';
import { DEFAULT_MAX_ERROR } from './compress-adapters.js';
import { projectAdapter, type BankSlotBases } from './project-adapter.js';

export interface AddToBankResult {
  readonly manifest: BankManifest;
  readonly entry: ManifestAdapter;
  /** Largest relative error among the compressed slots. */
  readonly maxError: number;
  /** Slots kept raw, with the reason. */
  readonly rawSlots: readonly { path: string; reason: string }[];
  /** The error budget the projection was held to. */
  readonly budget: number;
}

export interface AddToBankOptions {
  /** Take an adapter whose base_model_name_or_path differs from the bank's (the same model under another name). */
  readonly ignoreBaseModel?: boolean;
  /**
   * Error budget for the projection (default: the budget the bank was fitted with; for a bank fitted at a fixed
   * rank, which has none, DEFAULT_MAX_ERROR or its members' largest error, whichever is larger).
   */
  readonly maxError?: number;
  /** When the bank holds `id` already: replace that adapter in the same manifest switch (default: BANK_CONFLICT). */
  readonly replace?: boolean;
  /** Older manifests whose files must stay (a server's requests still load from them). */
  readonly keep?: readonly BankManifest[];
}

/**
 * The projection's error budget: the one given, else the bank's. A bank fitted at a fixed rank records none,
 * and a projection without one kept every slot compressed however poor the fit (an unrelated adapter stored at
 * ~100 % error): it then gets the default budget, or the largest error a member of the bank already has.
 */
function projectionBudget(manifest: BankManifest, given: number | undefined): number {
  if (given !== undefined) return given;
  if (manifest.options.maxError !== undefined) return manifest.options.maxError;
  let largest = DEFAULT_MAX_ERROR;
  for (const adapter of manifest.adapters) {
    for (const part of Object.values(adapter.perSlot)) if (part.storage === 'compressed' && part.relativeError > largest) largest = part.relativeError;
  }
  return largest;
}

/** Adds `adapter` as `id` to the bank in `dir`. Throws BANK_CONFLICT when the id exists, unless `replace`. */
export async function addToBank(dir: string, id: string, adapter: LoraAdapter, options: AddToBankOptions = {}): Promise<AddToBankResult> {
  checkAdapterId(id);
  return withBankLock(dir, async () => {
    const bank = await openBank(dir);
    if (bank.has(id) && !options.replace) {
      throw new SoppuError('BANK_CONFLICT', `${dir}: the bank already holds an adapter "${id}"; choose another --id, or --replace it`, { file: dir, field: 'id' });
    }
    // the replaced adapter leaves with this switch (its generation number is taken by the one below)
    const manifest = { ...manifestWithout(bank.manifest, id), generation: bank.manifest.generation };
    if (!options.ignoreBaseModel && manifest.baseModel !== null && adapter.config.baseModelNameOrPath !== null && adapter.config.baseModelNameOrPath !== manifest.baseModel) {
      throw new SoppuError('ADAPTER_INCOMPATIBLE', `${adapter.source}: base model "${adapter.config.baseModelNameOrPath}" differs from the bank's "${manifest.baseModel}" (pass --ignore-base-model if both name the same model)`, { file: adapter.source, field: 'base_model_name_or_path' });
    }
    const slots = new Map<string, BankSlotBases>();
    for (const slot of manifest.slots) {
      if (!adapter.modules.has(slot.path)) continue;
      const bases: (SlotBases | null)[] = [];
      for (let c = 0; c < manifest.clusters; c++) {
        if (slot.ranks[c] === null) {
          bases.push(null);
          continue;
        }
        const loaded = await bank.loadBases(basesKeyOf(c, slot.path));
        bases.push({ rank: loaded.rank, u: loaded.u, vt: loaded.vt });
      }
      slots.set(slot.path, { method: slot.method, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, bases });
    }
    const budget = projectionBudget(manifest, options.maxError);
    const projection = projectAdapter(adapter, slots, { maxError: budget });

    const newSlots: ManifestSlot[] = [...manifest.slots];
    const slotByPath = new Map(manifest.slots.map((s) => [s.path, s]));
    const perSlotResults = new Map<string, { slot: AdapterSlotResult; inFeatures: number; outFeatures: number; rank: number | null; diagonal: boolean }>();
    const perSlot: Record<string, ManifestAdapterSlot> = {};
    const rawSlots: { path: string; reason: string }[] = [];
    let zeroSlots = 0;
    for (const [path, result] of projection.slots) {
      const module = adapter.modules.get(path)!;
      let slot = slotByPath.get(path);
      const inBank = slot !== undefined;
      if (!slot) {
        slot = { path, inFeatures: module.inFeatures, outFeatures: module.outFeatures, method: manifest.method, ranks: new Array<null>(manifest.clusters).fill(null), sweeps: 0 };
        newSlots.push(slot);
        slotByPath.set(path, slot);
      }
      const rank = slot.ranks[projection.cluster] ?? null;
      perSlotResults.set(path, { slot: result, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, rank, diagonal: slot.method === 'jd-diag' });
      perSlot[path] = { ...manifestSlotEntry(result, rank), sourceRank: module.rank };
      if (result.storage === 'raw') rawSlots.push({ path, reason: inBank ? result.reason : 'slot-not-in-bank' });
      if (result.storage === 'zero') zeroSlots++;
    }
    const written = await writeAdapterFile(dir, id, adapterTensors(perSlotResults, adapter.passthrough));
    const flags = new Set<string>(adapter.flags);
    if (zeroSlots > 0) flags.add(zeroSlots === adapter.modules.size ? 'all-zero' : 'zero-modules');
    const sourceSha256 = await sourceWeightsSha256(adapter.source);
    let rawParameters = 0;
    for (const m of adapter.modules.values()) rawParameters += m.rank * (m.inFeatures + m.outFeatures);
    const entry: ManifestAdapter = {
      id, source: adapter.source, cluster: projection.cluster, baseModel: adapter.config.baseModelNameOrPath,
      sourceDtype: adapter.sourceDtype, flags: [...flags], rawParameters, addedBy: 'add', errorBasis: 'source',
      perSlot, file: written?.path ?? null, config: adapterConfigJsonOrNull(adapter),
      ...(sourceSha256 !== null ? { sourceSha256 } : {}),
      // verify holds the adapter to the budget it was projected under, where that is not the bank's
      ...(budget !== manifest.options.maxError ? { maxError: budget } : {}),
    };
    const adapters = [...manifest.adapters, entry];
    const reasons = refitReasonsOf(adapters);
    const next: BankManifest = {
      ...manifest,
      generation: manifest.generation + 1,
      updatedAt: new Date().toISOString(),
      baseModel: manifest.baseModel ?? (manifest.adapters.length === 0 ? adapter.config.baseModelNameOrPath : null),
      slots: newSlots,
      adapters,
      refitAdvised: reasons.length > 0,
      refitReasons: reasons,
      files: written ? { ...manifest.files, [written.path]: written.entry } : manifest.files,
    };
    await commitManifest(dir, next, bank.manifest, options.keep);
    return { manifest: next, entry, maxError: projection.maxError, rawSlots, budget };
  });
}
