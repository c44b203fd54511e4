/**
 * Smallest shared rank R with every member's relative error within its budget: the cap is checked first
 * (start-only fit, then the full fit if needed; if it misses the budget, it is the answer and nothing
 * else is fitted); else doubling from R = 1
 * until one passes, then bisection between the last failing and the first passing
 * rank. Each rank's fit is deterministic (its seed depends on the rank only), so the answer R comes
 * with a fit at R − 1 that was seen to fail.
 */
import type { JdMethod } from './compression-types.js';
import { deriveSeed, fitSlot, type SlotFit } from './fit-slot.js';
import type { JdFitOptions } from './jd-full.js';
import type { SlotProblem } from './slot-problem.js';

export interface RankPoint {
  readonly rank: number;
  readonly maxError: number;
  readonly meanError: number;
}

export interface RankSelection {
  /** The fit at the chosen rank (at the cap when no rank met the budget). */
  readonly fit: SlotFit;
  /** True when the chosen fit meets the budget for every member. */
  readonly withinBudget: boolean;
  /** Every rank that was fitted, ascending. */
  readonly errorByRank: readonly RankPoint[];
}

/**
 * `maxError` is the budget of every member, or per member (in the problem's order): what is left of
 * the budget after the error an input already carries (a refit from the bank's reconstruction).
 */
export function selectRank(problem: SlotProblem, method: JdMethod, maxError: number | readonly number[], maxRank: number,
  options: JdFitOptions & { readonly label: string }): RankSelection {
  const budgetOf = (member: number): number => (typeof maxError === 'number' ? maxError : (maxError[member] ?? 0));
  const passes = (fit: SlotFit): boolean => fit.errors.every((e, member) => e <= budgetOf(member));
  // The cap first: when even it misses the budget (unrelated adapters), no smaller rank can be chosen
  // and the whole ladder is skipped. A start-only fit (no sweeps) that already passes proves the
  // budget feasible without paying for the full fit at the largest rank.
  const quick = fitSlot(problem, method, maxRank, { ...options, maxSweeps: 0, seed: deriveSeed(options.seed, options.label, maxRank) });
  const fits = new Map<number, SlotFit>();
  const fitAt = (rank: number): SlotFit => {
    let fit = fits.get(rank);
    if (!fit) {
      fit = fitSlot(problem, method, rank, { ...options, seed: deriveSeed(options.seed, options.label, rank) });
      // sweeps raise the energy captured over all members, not each member's: one can end over its budget
      // where the start met every one, and that start is the better fit at the cap
      if (rank === maxRank && !passes(fit) && passes(quick)) fit = quick;
      fits.set(rank, fit);
    }
    return fit;
  };
  let failing = 0;
  let passing = -1;
  if (!passes(quick) && !passes(fitAt(maxRank))) failing = maxRank;
  for (let rank = 1; failing < maxRank; rank = Math.min(rank * 2, maxRank)) {
    if (passes(fitAt(rank))) { passing = rank; break; }
    failing = rank;
    if (rank >= maxRank) break;
  }
  if (passing > 0) {
    while (passing - failing > 1) {
      const middle = Math.floor((passing + failing) / 2);
      if (passes(fitAt(middle))) passing = middle;
      else failing = middle;
    }
  }
  const chosen = passing > 0 ? passing : maxRank;
  const errorByRank = [...fits.entries()].sort((x, y) => x[0] - y[0]).map(([rank, fit]) => ({
    rank,
    maxError: Math.max(...fit.errors),
    meanError: fit.errors.reduce((a, b) => a + b, 0) / Math.max(fit.errors.length, 1),
  }));
  return { fit: fitAt(chosen), withinBudget: passing > 0, errorByRank };
}
