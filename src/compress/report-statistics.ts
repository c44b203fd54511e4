/**
 * Numbers about a bank, from its manifest alone: parameters and bytes before and after compression,
 * per-slot storage counts, error distributions (correctly paired: each number is one adapter's error
 * on one slot), worst adapters. Used by `compress`, `bank ls` and `report`.
 */
import type { BankManifest } from './bank-manifest.js';

export interface SlotStatistics {
  readonly path: string;
  readonly layer: number;
  readonly module: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly ranks: readonly (number | null)[];
  readonly compressed: number;
  readonly raw: number;
  readonly zero: number;
  readonly meanError: number;
  readonly maxError: number;
  /** One entry per adapter that has this slot. */
  readonly errors: readonly { id: string; relativeError: number; storage: string }[];
  readonly rawParameters: number;
  readonly storedParameters: number;
}

export interface AdapterStatistics {
  readonly id: string;
  readonly cluster: number;
  readonly maxError: number;
  readonly meanError: number;
  /** Slot with the largest error. */
  readonly worstSlot: string | null;
  readonly compressed: number;
  readonly raw: number;
  readonly zero: number;
  readonly flags: readonly string[];
}

export interface BankStatistics {
  readonly adapters: number;
  readonly clusters: number;
  readonly method: string;
  /** Σ over adapters and slots of r·(in + out): what serving every adapter raw would store. */
  readonly rawParameters: number;
  /** Bases + cores + raw slots as stored. */
  readonly storedParameters: number;
  readonly basesParameters: number;
  readonly coreParameters: number;
  readonly rawSlotParameters: number;
  readonly parameterRatio: number;
  /** Raw parameters at f32 vs the bank's data files. */
  readonly rawBytesF32: number;
  readonly storedBytes: number;
  readonly byteRatio: number;
  readonly slots: readonly SlotStatistics[];
  /** Worst first. */
  readonly adapterStats: readonly AdapterStatistics[];
  readonly meanError: number;
  readonly maxError: number;
}

function layerOf(path: string): number {
  const match = /\.(\d+)\./.exec(path);
  return match ? Number(match[1]) : -1;
}

/** The largest of non-negative values (0 for none): a loop, as Math.max(...values) throws past ~125k values. */
function largest(values: readonly number[]): number {
  let max = 0;
  for (const value of values) if (value > max) max = value;
  return max;
}

export function bankStatistics(manifest: BankManifest): BankStatistics {
  const slots: SlotStatistics[] = [];
  let basesParameters = 0;
  let coreParameters = 0;
  let rawSlotParameters = 0;
  for (const slot of manifest.slots) {
    const errors: { id: string; relativeError: number; storage: string }[] = [];
    let compressed = 0, raw = 0, zero = 0, stored = 0, rawParameters = 0;
    for (const rank of slot.ranks) if (rank !== null) stored += rank * (slot.inFeatures + slot.outFeatures);
    basesParameters += stored;
    for (const adapter of manifest.adapters) {
      const part = adapter.perSlot[slot.path];
      if (!part) continue;
      errors.push({ id: adapter.id, relativeError: part.relativeError, storage: part.storage });
      const rank = part.rank ?? 0;
      rawParameters += (part.sourceRank ?? 0) * (slot.inFeatures + slot.outFeatures);
      if (part.storage === 'compressed') {
        compressed++;
        const core = slot.method === 'jd-diag' ? rank : rank * rank;
        coreParameters += core;
        stored += core;
      } else if (part.storage === 'raw') {
        raw++;
        rawSlotParameters += rank * (slot.inFeatures + slot.outFeatures);
        stored += rank * (slot.inFeatures + slot.outFeatures);
      } else {
        zero++;
      }
    }
    const values = errors.map((e) => e.relativeError);
    slots.push({
      path: slot.path, layer: layerOf(slot.path), module: slot.path.split('.').slice(-2).join('.'), inFeatures: slot.inFeatures,
      outFeatures: slot.outFeatures, ranks: slot.ranks, compressed, raw, zero, errors,
      meanError: values.length ? values.reduce((x, y) => x + y, 0) / values.length : 0,
      maxError: largest(values),
      rawParameters, storedParameters: stored,
    });
  }
  const adapterStats: AdapterStatistics[] = manifest.adapters.map((a) => {
    const entries = Object.entries(a.perSlot);
    let worstSlot: string | null = null;
    let maxError = 0;
    let sum = 0;
    for (const [path, p] of entries) {
      sum += p.relativeError;
      if (worstSlot === null || p.relativeError > maxError) { maxError = p.relativeError; worstSlot = path; }
    }
    return {
      id: a.id, cluster: a.cluster, maxError, meanError: entries.length ? sum / entries.length : 0, worstSlot,
      compressed: entries.filter(([, p]) => p.storage === 'compressed').length,
      raw: entries.filter(([, p]) => p.storage === 'raw').length,
      zero: entries.filter(([, p]) => p.storage === 'zero').length,
      flags: a.flags,
    };
  }).sort((x, y) => y.maxError - x.maxError || (x.id < y.id ? -1 : 1));
  const rawParameters = manifest.adapters.reduce((s, a) => s + a.rawParameters, 0);
  const storedParameters = basesParameters + coreParameters + rawSlotParameters;
  const storedBytes = Object.values(manifest.files).reduce((s, f) => s + f.bytes, 0);
  const all = manifest.adapters.flatMap((a) => Object.values(a.perSlot).map((p) => p.relativeError));
  return {
    adapters: manifest.adapters.length, clusters: manifest.clusters, method: manifest.method,
    rawParameters, storedParameters, basesParameters, coreParameters, rawSlotParameters,
    parameterRatio: storedParameters > 0 ? rawParameters / storedParameters : 0,
    rawBytesF32: rawParameters * 4, storedBytes, byteRatio: storedBytes > 0 ? (rawParameters * 4) / storedBytes : 0,
    slots, adapterStats,
    meanError: all.length ? all.reduce((x, y) => x + y, 0) / all.length : 0,
    maxError: largest(all),
  };
}

/** "12.3k", "4.56M" */
export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

export function formatBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(2)} MiB`;
  if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
  return `${n} B`;
}
