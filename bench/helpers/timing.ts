/** Timing helpers shared by the benchmarks. */

/** Seconds per call of `fn`: `rounds` rounds of ≥ minSeconds (or ≥ minCalls calls) each, the median round. */
export function secondsPerCall(fn: (call: number) => void, options: { warmup?: number; rounds?: number; minSeconds?: number; minCalls?: number } = {}): number {
  const { warmup = 2, rounds = 5, minSeconds = 0.25, minCalls = 3 } = options;
  let call = 0;
  for (let i = 0; i < warmup; i++) fn(call++);
  const perRound: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const start = process.hrtime.bigint();
    let calls = 0;
    let elapsed = 0;
    do {
      fn(call++);
      calls++;
      elapsed = Number(process.hrtime.bigint() - start) / 1e9;
    } while (elapsed < minSeconds || calls < minCalls);
    perRound.push(elapsed / calls);
  }
  perRound.sort((a, b) => a - b);
  return perRound[Math.floor(perRound.length / 2)]!;
}

/** Median of a list (the upper middle for an even count). */
export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** "median (min–max)" of a list, each as fmt writes it: a table cell for a figure measured over rounds. */
export function medianRange(values: readonly number[]): string {
  return `${fmt(median(values))} (${fmt(Math.min(...values))}–${fmt(Math.max(...values))})`;
}

/** Format a number with a fixed count of significant digits for tables. */
export function fmt(value: number | null | undefined, digits = 3): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  if (Math.abs(value) >= 10 ** digits) return value.toFixed(0);
  return value.toPrecision(digits);
}
