/**
 * One slot fit at a given rank with either method, cores returned at the adapters' own scale.
 */
import type { JdMethod } from './compression-types.js';
import { fitJdDiag } from './jd-diag.js';
import { fitJdFull, type JdFitOptions } from './jd-full.js';
import type { SlotProblem } from './slot-problem.js';

export interface SlotFit {
  readonly method: JdMethod;
  readonly rank: number;
  /** U: [out, R] */
  readonly u: Float64Array;
  /** V: [in, R] */
  readonly v: Float64Array;
  /** Per member: [R, R] (jd-full) or [R] (jd-diag), scale folded in, unweighted. */
  readonly cores: Float64Array[];
  /** Per member relative error. */
  readonly errors: Float64Array;
  /** Alternating sweeps run (JD-Full sweeps + JD-Diag sweeps). */
  readonly sweeps: number;
}

export function fitSlot(problem: SlotProblem, method: JdMethod, rank: number, options: JdFitOptions): SlotFit {
  // for jd-diag, maxSweeps bounds the ALS sweeps; its JD-Full start keeps the JD-Full default
  const full = fitJdFull(problem, rank, method === 'jd-full' || options.maxSweeps === 0 ? options : { ...options, maxSweeps: undefined });
  const fit = method === 'jd-full' ? full : fitJdDiag(problem, full, options);
  const cores = fit.cores.map((core, i) => {
    const unweighted = core.slice();
    const factor = problem.unweight[i]!;
    for (let j = 0; j < unweighted.length; j++) unweighted[j]! *= factor;
    return unweighted;
  });
  const sweeps = method === 'jd-full' ? full.sweeps : full.sweeps + fit.sweeps;
  return { method, rank, u: fit.u, v: fit.v, cores, errors: fit.errors, sweeps };
}

/** A seed for one (base seed, label, number) triple: FNV-1a over the label, mixed with the rest. */
export function deriveSeed(seed: number, label: string, value = 0): number {
  let hash = 0x811c9dc5 ^ (seed >>> 0);
  for (let i = 0; i < label.length; i++) hash = Math.imul(hash ^ label.charCodeAt(i), 0x01000193);
  hash = Math.imul(hash ^ (value >>> 0), 0x01000193);
  return hash >>> 0;
}
