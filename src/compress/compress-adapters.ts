/**
 * Joint compression of a set of adapters, slot by slot (see docs/compression.md):
 * validate → (cluster) → per slot and cluster: fit at a fixed rank or search the smallest rank
 * within the error budget → storage rule (zero / raw / compressed) → CompressionResult.
 */
import { SoppuError } from '../errors/soppu-error.js';
import { F32_MAX } from '../io/load-lora-adapter.js';
import type { LoraAdapter, LoraModule } from '../io/lora-types.js';
import { toF32, transpose } from '../linalg/index.js';
import { compareStrings } from './bank-manifest.js';
import { clusterAdapters, type ClusterSlot } from './cluster-adapters.js';
import type {
  AdapterInfo, AdapterSlotResult, CompressOptions, CompressionResult, JdMethod, SlotBases, SlotResult,
} from './compression-types.js';
import { deriveSeed, fitSlot, type SlotFit } from './fit-slot.js';
import { DEFAULT_FULL_SWEEPS, type JdFitOptions } from './jd-full.js';
import { selectRank, type RankPoint } from './select-rank.js';
import { relativeErrorOfPart } from './slot-errors.js';
import { buildSlotProblem, factoredNormSquared, type SlotEntry, type Weighting } from './slot-problem.js';

/** Error budget used when neither `rank` nor `maxError` is given. */
export const DEFAULT_MAX_ERROR = 0.1;
/** Chosen by measurement (docs/compression.md, "Weighting"). */
export const DEFAULT_WEIGHTING: Weighting = 'unit-norm';
export const DEFAULT_SEED = 0;

export interface CompressInput {
  readonly id: string;
  readonly adapter: LoraAdapter;
  /**
   * Per slot path, the relative error this adapter already carries against its original (a refit from a
   * bank's reconstruction): the error budget holds for it plus the new fit's, so the stored slot stays
   * within budget of the original (else it is kept raw: the reconstruction exactly).
   */
  readonly spentError?: Readonly<Record<string, number>>;
}

interface SlotSource {
  readonly path: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** Every adapter that has the slot, in input order. */
  readonly modules: readonly { adapterIndex: number; module: LoraModule }[];
  /** The non-zero ones. */
  readonly entries: readonly SlotEntry[];
}

/** Compresses `inputs` jointly. Async so progress bars can repaint between slots. */
export async function compressAdapters(unordered: readonly CompressInput[], options: CompressOptions, checks: { readonly ignoreBaseModel?: boolean } = {}): Promise<CompressionResult> {
  // by id: the fits and the k-means seeding walk adapters in order, so the same set in another order would
  // give another bank (other clusters, or bases that differ in rounding)
  const inputs = [...unordered].sort((p, q) => compareStrings(p.id, q.id));
  const resolved = resolveOptions(options, inputs.length);
  const sources = collectSlots(inputs, checks.ignoreBaseModel ?? false);
  const fitOptions: JdFitOptions = { tolerance: resolved.tolerance, maxSweeps: resolved.maxSweeps, seed: resolved.seed };
  const totalSteps = sources.length + (resolved.clusters > 1 ? 1 : 0);
  let done = 0;
  const progress = async (label: string): Promise<void> => {
    done++;
    options.onProgress?.(done, totalSteps, label);
    await new Promise<void>((resolve) => setImmediate(resolve));
  };

  let assignments: Int32Array = new Int32Array(inputs.length);
  if (resolved.clusters > 1) {
    const clusterSlots: ClusterSlot[] = sources.map((source) => ({
      path: source.path, inFeatures: source.inFeatures, outFeatures: source.outFeatures, entries: source.entries,
      rank: Math.min(resolved.rank ?? Math.max(1, ...source.entries.map((e) => e.rank)), source.inFeatures, source.outFeatures),
    }));
    assignments = clusterAdapters(clusterSlots, inputs.length, resolved.clusters, {
      method: resolved.method, weighting: resolved.weighting, fit: fitOptions,
    }).assignments;
    await progress('clustering');
  }

  const slots: SlotResult[] = [];
  for (const source of sources) {
    slots.push(compressSlot(source, inputs, assignments, resolved, fitOptions));
    await progress(source.path);
  }

  const adapters: AdapterInfo[] = inputs.map(({ id, adapter }, index) => {
    const flags = new Set<string>(adapter.flags);
    const zeroSlots = slots.filter((slot) => slot.adapters.get(id)?.storage === 'zero').length;
    if (zeroSlots > 0) flags.add(zeroSlots === adapter.modules.size ? 'all-zero' : 'zero-modules');
    let rawParameters = 0;
    for (const module of adapter.modules.values()) rawParameters += module.rank * (module.inFeatures + module.outFeatures);
    return {
      id, source: adapter.source, cluster: assignments[index]!, baseModel: adapter.config.baseModelNameOrPath,
      sourceDtype: adapter.sourceDtype, flags: [...flags], rawParameters,
    };
  });
  const { onProgress: _ignored, ...rest } = options;
  return {
    method: resolved.method,
    clusters: resolved.clusters,
    adapters,
    slots,
    options: { ...rest, maxError: resolved.maxError, weighting: resolved.weighting, tolerance: resolved.tolerance, maxSweeps: resolved.maxSweeps, seed: resolved.seed, clusters: resolved.clusters },
  };
}

interface ResolvedOptions {
  readonly method: JdMethod;
  readonly rank: number | undefined;
  readonly maxError: number | undefined;
  readonly clusters: number;
  readonly weighting: Weighting;
  readonly tolerance: number;
  readonly maxSweeps: number;
  readonly seed: number;
}

function resolveOptions(options: CompressOptions, count: number): ResolvedOptions {
  if (options.method !== 'jd-full' && options.method !== 'jd-diag') {
    throw new SoppuError('CONFIG', `method must be "jd-full" or "jd-diag", got ${JSON.stringify(options.method)}`, { field: 'method' });
  }
  if (options.rank !== undefined && !(Number.isSafeInteger(options.rank) && options.rank >= 1)) {
    throw new SoppuError('CONFIG', `rank must be a positive integer, got ${options.rank}`, { field: 'rank', limit: '≥ 1' });
  }
  if (options.maxError !== undefined && !(options.maxError > 0 && options.maxError <= 1)) {
    throw new SoppuError('CONFIG', `maxError must be in (0, 1], got ${options.maxError}`, { field: 'maxError', limit: '(0, 1]' });
  }
  const clusters = options.clusters ?? 1;
  if (!(Number.isSafeInteger(clusters) && clusters >= 1 && clusters <= Math.max(count, 1))) {
    throw new SoppuError('CONFIG', `clusters must be an integer between 1 and the number of adapters (${count}), got ${clusters}`, { field: 'clusters', limit: count });
  }
  if (options.weighting !== undefined && options.weighting !== 'unit-norm' && options.weighting !== 'none') {
    throw new SoppuError('CONFIG', `weighting must be "unit-norm" or "none", got ${JSON.stringify(options.weighting)}`, { field: 'weighting' });
  }
  const tolerance = options.tolerance ?? 1e-6;
  if (!(tolerance >= 0 && Number.isFinite(tolerance))) throw new SoppuError('CONFIG', `tolerance must be a finite number ≥ 0, got ${tolerance}`, { field: 'tolerance' });
  const maxSweeps = options.maxSweeps ?? (options.method === 'jd-full' ? DEFAULT_FULL_SWEEPS : 100);
  if (!(Number.isSafeInteger(maxSweeps) && maxSweeps >= 1)) throw new SoppuError('CONFIG', `maxSweeps must be a positive integer, got ${maxSweeps}`, { field: 'maxSweeps' });
  const seed = options.seed ?? DEFAULT_SEED;
  if (!Number.isSafeInteger(seed)) throw new SoppuError('CONFIG', `seed must be an integer, got ${seed}`, { field: 'seed' });
  return {
    method: options.method,
    rank: options.rank,
    maxError: options.maxError ?? (options.rank === undefined ? DEFAULT_MAX_ERROR : undefined),
    clusters, weighting: options.weighting ?? DEFAULT_WEIGHTING, tolerance, maxSweeps, seed,
  };
}

/** Validates the inputs and groups modules by slot, sorted by path. */
function collectSlots(inputs: readonly CompressInput[], ignoreBaseModel: boolean): SlotSource[] {
  const ids = new Set<string>();
  let baseModelOwner: CompressInput | null = null;
  for (const input of inputs) {
    if (ids.has(input.id)) throw new SoppuError('CONFIG', `adapter id ${JSON.stringify(input.id)} is given twice`, { field: 'id' });
    ids.add(input.id);
    const baseModel = input.adapter.config.baseModelNameOrPath;
    // names are not always comparable (a local folder and a hub id for one model): the caller may vouch for them
    if (baseModel === null || ignoreBaseModel) continue;
    if (baseModelOwner && baseModelOwner.adapter.config.baseModelNameOrPath !== baseModel) {
      throw new SoppuError('ADAPTER_INCOMPATIBLE',
        `adapters ${JSON.stringify(baseModelOwner.id)} and ${JSON.stringify(input.id)} were trained on different base models ` +
        `(${JSON.stringify(baseModelOwner.adapter.config.baseModelNameOrPath)} vs ${JSON.stringify(baseModel)}; pass --ignore-base-model if both name the same model)`,
        { field: 'base_model_name_or_path', adapters: [baseModelOwner.id, input.id] });
    }
    baseModelOwner ??= input;
  }
  const byPath = new Map<string, { first: CompressInput; modules: { adapterIndex: number; module: LoraModule }[] }>();
  inputs.forEach((input, adapterIndex) => {
    for (const module of input.adapter.modules.values()) {
      const slot = byPath.get(module.path);
      if (!slot) { byPath.set(module.path, { first: input, modules: [{ adapterIndex, module }] }); continue; }
      const reference = slot.modules[0]!.module;
      if (reference.inFeatures !== module.inFeatures || reference.outFeatures !== module.outFeatures) {
        throw new SoppuError('ADAPTER_INCOMPATIBLE',
          `adapters ${JSON.stringify(slot.first.id)} and ${JSON.stringify(input.id)} disagree on the shape of ${module.path}: ` +
          `[out ${reference.outFeatures}, in ${reference.inFeatures}] vs [out ${module.outFeatures}, in ${module.inFeatures}]`,
          { tensor: module.path, adapters: [slot.first.id, input.id] });
      }
      slot.modules.push({ adapterIndex, module });
    }
  });
  return [...byPath.entries()].sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0)).map(([path, slot]) => {
    const entries: SlotEntry[] = [];
    for (const { adapterIndex, module } of slot.modules) {
      checkModule(module, inputs[adapterIndex]!.id);
      const normSquared = factoredNormSquared(module.a, module.b, module.rank, module.inFeatures, module.outFeatures, module.scale);
      if (!Number.isFinite(normSquared)) {
        throw new SoppuError('ADAPTER_TENSORS', `adapter ${JSON.stringify(inputs[adapterIndex]!.id)}: ${path} has non-finite values (‖ΔW‖ is not finite)`, { tensor: path });
      }
      if (normSquared > 0) entries.push({ adapterIndex, rank: module.rank, scale: module.scale, a: module.a, b: module.b, normSquared });
    }
    const reference = slot.modules[0]!.module;
    return { path, inFeatures: reference.inFeatures, outFeatures: reference.outFeatures, modules: slot.modules, entries };
  });
}

function checkModule(module: LoraModule, id: string): void {
  const { rank, inFeatures, outFeatures } = module;
  if (!(Number.isSafeInteger(rank) && rank >= 1) || module.a.length !== rank * inFeatures || module.b.length !== outFeatures * rank) {
    throw new SoppuError('ADAPTER_TENSORS',
      `adapter ${JSON.stringify(id)}: ${module.path} factors do not match rank ${rank}, in ${inFeatures}, out ${outFeatures} ` +
      `(A has ${module.a.length} values, B has ${module.b.length})`, { tensor: module.path });
  }
  if (!Number.isFinite(module.scale)) throw new SoppuError('ADAPTER_TENSORS', `adapter ${JSON.stringify(id)}: ${module.path} has scale ${module.scale}`, { tensor: module.path });
  // a raw slot stores scale·B in f32 (the loader refuses such adapters too; in-memory ones land here)
  let largest = 0;
  for (let j = 0; j < module.b.length; j++) largest = Math.max(largest, Math.abs(module.b[j]!));
  if (!Number.isFinite(Math.fround(largest * module.scale))) {
    throw new SoppuError('ADAPTER_TENSORS',
      `adapter ${JSON.stringify(id)}: ${module.path}: scale ${module.scale} times the largest |B| ${largest} is beyond the f32 range (±${F32_MAX})`,
      { tensor: module.path, limit: F32_MAX });
  }
}

/**
 * Refuses a fitted part (core, bases) or its relative error when not finite in f32, before anything
 * is written: a bank holding one cannot be read back. `what` names the adapter or cluster.
 */
export function checkFinitePart(what: string, path: string, part: Float32Array, error = 0): void {
  for (let i = 0; i < part.length; i++) {
    if (!Number.isFinite(part[i]!)) {
      throw new SoppuError('ADAPTER_TENSORS', `${what}: ${path}: the fit gives a non-finite value (${part[i]}) at element ${i}; ΔW is beyond the f32 range (±${F32_MAX})`,
        { tensor: path, limit: F32_MAX });
    }
  }
  if (!Number.isFinite(error)) {
    throw new SoppuError('ADAPTER_TENSORS', `${what}: ${path}: the relative error of the fit is ${error}; ΔW is beyond the range its error can be measured in`, { tensor: path });
  }
}

function compressSlot(source: SlotSource, inputs: readonly CompressInput[], assignments: Int32Array,
  options: ResolvedOptions, fitOptions: JdFitOptions): SlotResult {
  const { path, inFeatures, outFeatures, method } = { ...source, method: options.method };
  const results = new Map<string, AdapterSlotResult>();
  const bases: (SlotBases | null)[] = [];
  const errorByRank: { cluster: number; rank: number; maxError: number; meanError: number }[] = [];
  const moduleOf = new Map(source.modules.map(({ adapterIndex, module }) => [adapterIndex, module]));
  const nonZero = new Set(source.entries.map((e) => e.adapterIndex));
  for (const { adapterIndex } of source.modules) {
    if (!nonZero.has(adapterIndex)) results.set(inputs[adapterIndex]!.id, { storage: 'zero', relativeError: 0 });
  }
  // error a member already carries in this slot (refit from the bank): only the rest of the budget is its own
  const spentOf = (entry: SlotEntry): number => inputs[entry.adapterIndex]!.spentError?.[path] ?? 0;
  const storeRaw = (entry: SlotEntry, reason: 'cheaper-raw' | 'over-budget'): void => {
    results.set(inputs[entry.adapterIndex]!.id, rawResult(moduleOf.get(entry.adapterIndex)!, reason));
  };
  let sweeps = 0;
  for (let cluster = 0; cluster < options.clusters; cluster++) {
    let members = source.entries.filter((e) => assignments[e.adapterIndex] === cluster);
    // Members that miss the budget even at the cap (unrelated to the rest) are stored raw, and the others fitted
    // again without them: kept in, they made the cap the answer, and at the cap the rest cost more than raw too
    // (20 adapters sharing a rank-2 subspace went raw beside 4 unrelated ones).
    for (;;) {
      if (members.length === 0) { bases.push(null); break; }
      // No rank above the break-even one can be stored (compressed would exceed raw): cap the search there.
      const breakEven = breakEvenRank(members, inFeatures, outFeatures, method);
      if (breakEven < 1) {
        for (const entry of members) storeRaw(entry, 'cheaper-raw');
        bases.push(null);
        break;
      }
      const problem = buildSlotProblem(members, inFeatures, outFeatures, options.weighting);
      const cap = Math.max(1, Math.min(options.rank ?? Number.POSITIVE_INFINITY, inFeatures, outFeatures, problem.totalRank, breakEven));
      const label = `${path}/cluster-${cluster}`;
      let fit: SlotFit;
      let points: readonly RankPoint[] = [];
      let missed = false;
      // each member's budget: the bank's, less what an earlier fit already spent of it
      const budgets = options.maxError !== undefined ? members.map((entry) => options.maxError! - spentOf(entry)) : null;
      if (budgets) {
        const selection = selectRank(problem, method, budgets, cap, { ...fitOptions, label });
        fit = selection.fit;
        points = selection.errorByRank;
        missed = !selection.withinBudget;
      } else {
        fit = fitSlot(problem, method, cap, { ...fitOptions, seed: deriveSeed(fitOptions.seed, label, cap) });
      }
      sweeps += fit.sweeps;
      if (missed && budgets) {
        const within = members.map((_, i) => fit.errors[i]! <= budgets[i]!);
        const keptCount = within.filter(Boolean).length;
        if (keptCount > 0 && keptCount < members.length) {
          members.forEach((entry, i) => { if (!within[i]) storeRaw(entry, 'over-budget'); });
          members = members.filter((_, i) => within[i]);
          continue;
        }
      }
      for (const point of points) errorByRank.push({ cluster, ...point });
      const rank = fit.rank;
      const u = toF32(fit.u);
      const vt = toF32(transpose(fit.v, inFeatures, rank));
      checkFinitePart(`cluster ${cluster} shared bases`, path, u);
      checkFinitePart(`cluster ${cluster} shared bases`, path, vt);
      // Per member: the stored (f32) part's error decides the budget.
      const compressed: { entry: SlotEntry; core: Float32Array; error: number }[] = [];
      for (let i = 0; i < members.length; i++) {
        const entry = members[i]!;
        const module = moduleOf.get(entry.adapterIndex)!;
        const core = toF32(fit.cores[i]!);
        const error = relativeErrorOfPart(module, { u, vt, rank, core, diagonal: method === 'jd-diag' });
        const id = inputs[entry.adapterIndex]!.id;
        checkFinitePart(`adapter ${JSON.stringify(id)}`, path, core, error);
        if (options.maxError !== undefined && !(error + spentOf(entry) <= options.maxError)) storeRaw(entry, 'over-budget');
        else compressed.push({ entry, core, error });
      }
      const coreSize = method === 'jd-full' ? rank * rank : rank;
      const compressedCost = rank * (inFeatures + outFeatures) + compressed.length * coreSize;
      const rawCost = compressed.reduce((sum, c) => sum + c.entry.rank * (inFeatures + outFeatures), 0);
      if (compressed.length === 0 || compressedCost > rawCost) {
        for (const { entry } of compressed) storeRaw(entry, 'cheaper-raw');
        bases.push(null);
        break;
      }
      for (const { entry, core, error } of compressed) {
        results.set(inputs[entry.adapterIndex]!.id, { storage: 'compressed', core, relativeError: error });
      }
      bases.push({ rank, u, vt });
      break;
    }
  }
  // Keep the adapters map in input order.
  const adapters = new Map<string, AdapterSlotResult>();
  for (const { adapterIndex } of source.modules) {
    const id = inputs[adapterIndex]!.id;
    adapters.set(id, results.get(id)!);
  }
  return {
    path, inFeatures, outFeatures, method, bases, adapters, sweeps,
    ...(options.maxError !== undefined ? { errorByRank } : {}),
  };
}

/** Largest R whose compressed storage R·(in + out) + n·(R² or R) is within the members' raw storage (0: none). */
export function breakEvenRank(members: readonly SlotEntry[], inFeatures: number, outFeatures: number, method: JdMethod): number {
  const raw = members.reduce((sum, e) => sum + e.rank * (inFeatures + outFeatures), 0);
  let rank = 0;
  for (;;) {
    const next = rank + 1;
    const cost = next * (inFeatures + outFeatures) + members.length * (method === 'jd-full' ? next * next : next);
    if (cost > raw) return rank;
    rank = next;
  }
}

/** The module kept exact: A copied, B with the scale folded in. */
export function rawResult(module: LoraModule, reason: 'cheaper-raw' | 'over-budget' | 'projection-over-budget'): AdapterSlotResult {
  const b = new Float32Array(module.b.length);
  for (let j = 0; j < b.length; j++) b[j] = module.b[j]! * module.scale;
  return { storage: 'raw', rank: module.rank, a: Float32Array.from(module.a), b, relativeError: 0, reason };
}
