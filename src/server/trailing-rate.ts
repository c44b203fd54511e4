/**
 * A counter's rate over a trailing window, sampled on a timer rather than at each read, so every
 * reader (two scrapers, a person with curl) sees the same value and a read never resets it.
 */
export class TrailingRate {
  private readonly samples: { at: number; value: number }[] = [];
  private readonly timer: NodeJS.Timeout | null;

  /**
   * @param read the counter (monotonic)
   * @param windowMs the rate is taken over at least this much of the past once the counter has been
   *   sampled that long (less just after start)
   * @param intervalMs sampling period; 0 samples only when `sample` or `perSecond` is called (tests)
   */
  constructor(
    private readonly read: () => number,
    private readonly windowMs = 10_000,
    intervalMs = 1_000,
    private readonly now: () => number = Date.now,
  ) {
    this.sample();
    this.timer = intervalMs > 0 ? setInterval(() => this.sample(), intervalMs) : null;
    this.timer?.unref();
  }

  /** Records the counter now, dropping samples no longer needed for the window. */
  sample(): void {
    const at = this.now();
    this.samples.push({ at, value: this.read() });
    // keep the newest sample at or before the window's start: the span covers the whole window
    while (this.samples.length > 2 && this.samples[1]!.at <= at - this.windowMs) this.samples.shift();
  }

  /** Increase per second from the oldest sample kept to now (0 before any time has passed). */
  perSecond(): number {
    this.sample();
    const first = this.samples[0]!;
    const last = this.samples[this.samples.length - 1]!;
    const seconds = (last.at - first.at) / 1000;
    return seconds > 0 ? (last.value - first.value) / seconds : 0;
  }

  /** Stops the sampling timer. */
  close(): void {
    if (this.timer) clearInterval(this.timer);
  }
}
