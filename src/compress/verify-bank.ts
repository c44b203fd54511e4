/**
 * `soppu verify`: per adapter and slot, the relative weight error ‖ΔW − reconstruction‖_F / ‖ΔW‖_F of
 * the bank's reconstruction, measured against the original adapters when given (paired by id, never by
 * position), else the errors recorded in the manifest. Also checks every data file's checksum.
 * Computed in factored form: nothing [out, in] is formed.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraAdapter, LoraModule } from '../io/lora-types.js';
import { compareStrings } from './bank-manifest.js';
import { reconstructAdapter, type Bank, type ReconstructedSlot } from './bank-reader.js';

export interface VerifiedSlot {
  readonly path: string;
  readonly storage: 'compressed' | 'raw' | 'zero' | 'missing';
  /** Measured (vs the source) or recorded error. Infinity: the bank stores ΔW ≠ 0 where the source has none. */
  readonly relativeError: number;
  readonly recordedError: number | null;
}

export interface VerifiedAdapter {
  readonly id: string;
  readonly cluster: number;
  /** 'source': measured against the given original; 'recorded': the manifest's numbers. */
  readonly basis: 'source' | 'recorded';
  readonly maxError: number;
  readonly meanError: number;
  readonly slots: readonly VerifiedSlot[];
  /** The budget it is held to: the one given, else the one it was stored under (`bank add --max-error`), else the bank's. */
  readonly budget: number | null;
  readonly overBudget: boolean;
  /** Filled by the optional model check (next-token distributions), when one is given. */
  readonly modelCheck?: ModelCheckResult;
}

/**
 * Hook for comparing the model's next-token behaviour with the original adapter and with the bank's
 * version (needs the engine, which compress may not import: the CLI's `verify --model` supplies it).
 * On the original's greedy continuation, teacher-forced (both models see the same context at every
 * position): KL(original ‖ bank) of the whole next-token distributions, the share of positions whose
 * most likely token agrees, and the gap |log p_original(token) − log p_bank(token)| of the original's token
 * (mean and max over the positions).
 */
export interface ModelCheckResult {
  readonly tokens: number;
  readonly meanKl: number;
  readonly maxKl: number;
  readonly top1Agreement: number;
  readonly meanLogprobGap: number;
  readonly maxLogprobGap: number;
}
export type ModelCheck = (bank: Bank, id: string, source: LoraAdapter | null) => Promise<ModelCheckResult>;

export interface VerifyReport {
  readonly dir: string;
  readonly maxErrorBudget: number | null;
  /** Worst adapters first. */
  readonly adapters: readonly VerifiedAdapter[];
  readonly overBudget: readonly string[];
  /** Data files whose size, checksum or tensors do not match the manifest. */
  readonly fileProblems: readonly { file: string; message: string }[];
}

export interface VerifyOptions {
  /** Original adapters keyed by bank id. */
  readonly sources?: ReadonlyMap<string, LoraAdapter>;
  /** Error budget for every adapter (default: each adapter's own, else the bank's recorded maxError; none: nothing is over budget). */
  readonly maxError?: number;
  readonly modelCheck?: ModelCheck;
}

/** Σ_ij (PᵀP')_ij · (Q Q'ᵀ)_ij = ⟨P·Q, P'·Q'⟩_F for P [out, r], Q [r, in], P' [out, r'], Q' [r', in]. */
function factoredInner(p: Float32Array, q: Float32Array, r: number, p2: Float32Array, q2: Float32Array, r2: number, out: number, inFeatures: number): number {
  const left = new Float64Array(r * r2);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < r; i++) {
      const x = p[o * r + i]!;
      if (x === 0) continue;
      for (let j = 0; j < r2; j++) left[i * r2 + j] = left[i * r2 + j]! + x * p2[o * r2 + j]!;
    }
  }
  let sum = 0;
  for (let i = 0; i < r; i++) {
    for (let j = 0; j < r2; j++) {
      let right = 0;
      for (let k = 0; k < inFeatures; k++) right += q[i * inFeatures + k]! * q2[j * inFeatures + k]!;
      sum += left[i * r2 + j]! * right;
    }
  }
  return sum;
}

/** ‖s·B·A − B'·A'‖ / ‖s·B·A‖ (reconstruction null = 0; Infinity when only the reconstruction is non-zero). */
export function relativeErrorVsSource(module: LoraModule, reconstruction: ReconstructedSlot | null): number {
  const { rank, inFeatures, outFeatures, scale } = module;
  const sourceSquared = scale * scale * factoredInner(module.b, module.a, rank, module.b, module.a, rank, outFeatures, inFeatures);
  if (!reconstruction) return sourceSquared > 0 ? 1 : 0;
  if (reconstruction.inFeatures !== inFeatures || reconstruction.outFeatures !== outFeatures) {
    throw new SoppuError('ADAPTER_INCOMPATIBLE', `${module.path}: source is [out ${outFeatures}, in ${inFeatures}], the bank's slot is [out ${reconstruction.outFeatures}, in ${reconstruction.inFeatures}]`, { tensor: module.path });
  }
  const r2 = reconstruction.rank;
  const cross = scale * factoredInner(module.b, module.a, rank, reconstruction.b, reconstruction.a, r2, outFeatures, inFeatures);
  const reconstructionSquared = factoredInner(reconstruction.b, reconstruction.a, r2, reconstruction.b, reconstruction.a, r2, outFeatures, inFeatures);
  if (sourceSquared === 0) return reconstructionSquared > 0 ? Number.POSITIVE_INFINITY : 0;
  return Math.sqrt(Math.max(0, sourceSquared - 2 * cross + reconstructionSquared) / sourceSquared);
}

export async function verifyBank(bank: Bank, options: VerifyOptions = {}): Promise<VerifyReport> {
  const sources = options.sources ?? new Map<string, LoraAdapter>();
  for (const id of sources.keys()) {
    if (!bank.has(id)) throw new SoppuError('CONFIG', `--adapters: adapter id "${id}" is not in the bank ${bank.dir} (ids pair by directory name, or id=dir)`, { field: 'adapters' });
  }
  const bankBudget = options.maxError ?? bank.manifest.options.maxError ?? null;
  const fileProblems = (await bank.verifyFiles()).map((e) => ({ file: String(e.context.file ?? bank.dir), message: e.message }));
  const brokenFiles = new Set(fileProblems.map((p) => p.file));
  const adapters: VerifiedAdapter[] = [];
  for (const id of bank.ids()) {
    const entry = bank.adapter(id);
    const source = sources.get(id) ?? null;
    const slots: VerifiedSlot[] = [];
    if (source) {
      let reconstruction: Map<string, ReconstructedSlot>;
      try {
        reconstruction = await reconstructAdapter(bank, id);
      } catch (e) {
        if (e instanceof SoppuError && brokenFiles.has(String(e.context.file))) continue;
        throw e;
      }
      const paths = [...new Set([...source.modules.keys(), ...Object.keys(entry.perSlot)])].sort(compareStrings);
      for (const path of paths) {
        const recorded = entry.perSlot[path];
        const module = source.modules.get(path);
        const rec = reconstruction.get(path) ?? null;
        let error: number;
        if (module) {
          try {
            error = relativeErrorVsSource(module, rec);
          } catch (e) {
            // which original it was (the slot alone named neither the adapter nor its folder)
            if (e instanceof SoppuError) throw new SoppuError(e.code, `adapter ${id} (${source.source || 'in memory'}): ${e.message}`, { ...e.context, file: source.source }, { cause: e });
            throw e;
          }
        }
        else error = rec ? Number.POSITIVE_INFINITY : 0;
        slots.push({ path, storage: recorded ? recorded.storage : 'missing', relativeError: error, recordedError: recorded?.relativeError ?? null });
      }
    } else {
      for (const path of Object.keys(entry.perSlot).sort(compareStrings)) {
        const recorded = entry.perSlot[path]!;
        slots.push({ path, storage: recorded.storage, relativeError: recorded.relativeError, recordedError: recorded.relativeError });
      }
    }
    const errors = slots.map((s) => s.relativeError);
    const maxError = errors.length > 0 ? Math.max(...errors) : 0;
    const meanError = errors.length > 0 ? errors.reduce((x, y) => x + y, 0) / errors.length : 0;
    const modelCheck = options.modelCheck ? await options.modelCheck(bank, id, source) : undefined;
    // the budget given, else the one the adapter was stored under (a `bank add --max-error`), else the bank's
    const budget = options.maxError ?? entry.maxError ?? bankBudget;
    adapters.push({
      id, cluster: entry.cluster, basis: source ? 'source' : 'recorded', maxError, meanError, slots, budget,
      overBudget: budget !== null && !(maxError <= budget * (1 + 1e-4)),
      ...(modelCheck ? { modelCheck } : {}),
    });
  }
  adapters.sort((x, y) => y.maxError - x.maxError || compareStrings(x.id, y.id));
  return { dir: bank.dir, maxErrorBudget: bankBudget, adapters, overBudget: adapters.filter((a) => a.overBudget).map((a) => a.id), fileProblems };
}
