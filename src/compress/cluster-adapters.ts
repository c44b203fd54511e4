/**
 * Assigns each adapter to one of k clusters (the same cluster in every slot): one fit over all
 * adapters per slot, seeded k-means++ / Lloyd on the normalised core energies per basis direction, then alternate
 * "refit each cluster's bases per slot" and "move each adapter to the cluster whose bases
 * reconstruct it best over all its slots" until no adapter moves (or maxIterations).
 */
import { Random } from '../tensor/random.js';
import type { JdMethod } from './compression-types.js';
import { deriveSeed, fitSlot, type SlotFit } from './fit-slot.js';
import type { JdFitOptions } from './jd-full.js';
import { bestCoreOnBases } from './slot-errors.js';
import { buildSlotProblem, type SlotEntry, type Weighting } from './slot-problem.js';

/** One slot's non-zero entries and the rank to fit it at while clustering. */
export interface ClusterSlot {
  readonly path: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly entries: readonly SlotEntry[];
  readonly rank: number;
}

export interface ClusterOptions {
  readonly method: JdMethod;
  readonly weighting: Weighting;
  readonly fit: JdFitOptions;
  readonly maxIterations?: number;
}

export interface ClusterAssignment {
  /** Cluster index per adapter. */
  readonly assignments: Int32Array;
  /** Refit/reassign rounds run. */
  readonly iterations: number;
  /** Total reconstruction cost after each round. */
  readonly costHistory: readonly number[];
}

export function clusterAdapters(slots: readonly ClusterSlot[], adapterCount: number, clusters: number,
  options: ClusterOptions): ClusterAssignment {
  const assignments = new Int32Array(adapterCount);
  if (clusters <= 1 || adapterCount <= 1) return { assignments, iterations: 0, costHistory: [] };
  const random = new Random(deriveSeed(options.fit.seed, 'k-means'));
  // 1. one fit over all adapters per slot at k·R (so every family can show up in it); features =
  //    each adapter's energy per basis direction (row and column energies of its core, / ‖ΔWᵢ‖²),
  //    which says which part of the shared subspace the adapter lives in and ignores signs.
  const initialRanks = slots.map((slot) => Math.max(1, Math.min(clusters * slot.rank, slot.inFeatures, slot.outFeatures,
    slot.entries.reduce((sum, e) => sum + e.rank, 0))));
  const blockSizes = initialRanks.map((rank) => (options.method === 'jd-full' ? 2 * rank : rank));
  const featureLength = blockSizes.reduce((a, b) => a + b, 0);
  const features = new Float64Array(adapterCount * featureLength);
  let offset = 0;
  slots.forEach((slot, s) => {
    if (slot.entries.length > 0) {
      const rank = initialRanks[s]!;
      const fit = fitFor({ ...slot, rank }, slot.entries, options, 'all');
      slot.entries.forEach((entry, i) => {
        const core = fit.cores[i]!;
        const base = entry.adapterIndex * featureLength + offset;
        for (let p = 0; p < fit.rank; p++) {
          if (options.method === 'jd-diag') { features[base + p] = core[p]! ** 2 / entry.normSquared; continue; }
          for (let q = 0; q < fit.rank; q++) {
            const energy = core[p * fit.rank + q]! ** 2 / entry.normSquared;
            features[base + p]! += energy;
            features[base + rank + q]! += energy;
          }
        }
      });
    }
    offset += blockSizes[s]!;
  });
  kMeans(features, adapterCount, featureLength, clusters, random, assignments);
  // 2. alternate refit / reassign.
  const maxIterations = options.maxIterations ?? 10;
  const costHistory: number[] = [];
  let iterations = 0;
  for (; iterations < maxIterations; iterations++) {
    const cost = new Float64Array(adapterCount * clusters);
    for (const slot of slots) {
      for (let c = 0; c < clusters; c++) {
        const members = slot.entries.filter((e) => assignments[e.adapterIndex] === c);
        const fit = members.length > 0 ? fitFor(slot, members, options, `cluster-${c}`) : null;
        for (const entry of slot.entries) {
          // weighted squared error of this adapter on cluster c's bases (no bases: all of it is lost)
          const weight = options.weighting === 'unit-norm' ? 1 / entry.normSquared : 1;
          let errorSquared = entry.normSquared;
          if (fit) {
            const module = { a: entry.a, b: entry.b, rank: entry.rank, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, scale: entry.scale };
            const { relativeError } = bestCoreOnBases(module, fit.u, fit.v, fit.rank, options.method === 'jd-diag', entry.normSquared);
            errorSquared = relativeError * relativeError * entry.normSquared;
          }
          cost[entry.adapterIndex * clusters + c]! += weight * errorSquared;
        }
      }
    }
    let moved = 0;
    let total = 0;
    for (let i = 0; i < adapterCount; i++) {
      let best = assignments[i]!;
      // a relative margin: with weighting none the costs scale with the adapters' norms (an absolute one kept
      // small adapters in a clearly worse cluster)
      for (let c = 0; c < clusters; c++) if (cost[i * clusters + c]! < cost[i * clusters + best]! * (1 - 1e-12)) best = c;
      total += cost[i * clusters + best]!;
      if (best !== assignments[i]) { assignments[i] = best; moved++; }
    }
    costHistory.push(total);
    if (moved === 0) { iterations++; break; }
  }
  return { assignments, iterations, costHistory };
}

function fitFor(slot: ClusterSlot, members: readonly SlotEntry[], options: ClusterOptions, label: string): SlotFit {
  const totalRank = members.reduce((sum, e) => sum + e.rank, 0);
  const rank = Math.max(1, Math.min(slot.rank, totalRank, slot.inFeatures, slot.outFeatures));
  const problem = buildSlotProblem(members, slot.inFeatures, slot.outFeatures, options.weighting);
  return fitSlot(problem, options.method, rank, { ...options.fit, seed: deriveSeed(options.fit.seed, `${slot.path}/${label}`, rank) });
}

/** Seeded k-means++ then Lloyd iterations; writes the cluster of each point into `assignments`. */
export function kMeans(points: Float64Array, count: number, dimension: number, k: number, random: Random,
  assignments: Int32Array): void {
  const centres = new Float64Array(k * dimension);
  const distance = (point: number, centre: number): number => {
    let sum = 0;
    for (let j = 0; j < dimension; j++) sum += (points[point * dimension + j]! - centres[centre * dimension + j]!) ** 2;
    return sum;
  };
  // k-means++ seeding
  const first = random.int(count);
  centres.set(points.subarray(first * dimension, (first + 1) * dimension), 0);
  const nearest = new Float64Array(count).fill(Number.POSITIVE_INFINITY);
  for (let c = 1; c < k; c++) {
    let total = 0;
    for (let i = 0; i < count; i++) { nearest[i] = Math.min(nearest[i]!, distance(i, c - 1)); total += nearest[i]!; }
    let pick = 0;
    if (total > 0) {
      let target = random.next() * total;
      for (pick = 0; pick < count - 1; pick++) { target -= nearest[pick]!; if (target <= 0) break; }
    } else {
      pick = random.int(count);
    }
    centres.set(points.subarray(pick * dimension, (pick + 1) * dimension), c * dimension);
  }
  assignments.fill(-1);
  for (let iteration = 0; iteration < 100; iteration++) {
    let changed = false;
    for (let i = 0; i < count; i++) {
      let best = 0, bestDistance = distance(i, 0);
      for (let c = 1; c < k; c++) { const d = distance(i, c); if (d < bestDistance) { best = c; bestDistance = d; } }
      if (assignments[i] !== best) { assignments[i] = best; changed = true; }
    }
    if (!changed) break;
    const sizes = new Float64Array(k);
    const sums = new Float64Array(k * dimension);
    for (let i = 0; i < count; i++) {
      const c = assignments[i]!;
      sizes[c]!++;
      for (let j = 0; j < dimension; j++) sums[c * dimension + j]! += points[i * dimension + j]!;
    }
    for (let c = 0; c < k; c++) {
      if (sizes[c] === 0) continue; // an empty cluster keeps its centre
      for (let j = 0; j < dimension; j++) centres[c * dimension + j] = sums[c * dimension + j]! / sizes[c]!;
    }
  }
}
