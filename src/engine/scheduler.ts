/**
 * Continuous batching. Requests join and leave at step boundaries; each step mixes decode rows (one
 * per running sequence) with prefill chunks (long prompts split under a batch-token budget). A
 * request that does not fit (KV blocks, batch tokens, running limit, adapter not yet loaded) waits;
 * when decode runs out of KV blocks the youngest running sequence is preempted: its blocks are
 * freed and it is recomputed later from its tokens so far.
 */
import type { KvBlockPool } from './kv-block-pool.js';

/** What the scheduler needs to know about a sequence. */
export interface ScheduledSequence {
  /** Unique and increasing with arrival: a larger id is younger. */
  readonly id: number;
  /** All tokens known so far: prompt, then generated. */
  readonly tokens: readonly number[];
  /** Tokens whose K/V are in the cache. */
  computed: number;
  /** Whether it may start (its adapter is resident). */
  ready(): boolean;
  /** Number of times it was preempted (for stats and tests). */
  preemptions: number;
}

/** One sequence's share of a step: tokens[start, start + count) are fed. */
export interface StepEntry<S extends ScheduledSequence> {
  readonly seq: S;
  readonly start: number;
  readonly count: number;
  /** True when the chunk reaches the last known token, so the next token's logits are wanted. */
  readonly wantsNext: boolean;
}

export interface SchedulerLimits {
  readonly maxBatchTokens: number;
  readonly maxRunningRequests: number;
}

export class Scheduler<S extends ScheduledSequence> {
  /** In arrival order. */
  readonly running: S[] = [];
  /** In arrival order (preempted sequences go back in by id). */
  readonly waiting: S[] = [];
  private readonly pool: KvBlockPool;
  private readonly limits: SchedulerLimits;
  preemptions = 0;

  constructor(pool: KvBlockPool, limits: SchedulerLimits) {
    this.pool = pool;
    this.limits = limits;
  }

  add(seq: S): void {
    insertById(this.waiting, seq);
  }

  /** Removes a sequence wherever it is and frees its blocks. */
  remove(seq: S): void {
    const r = this.running.indexOf(seq);
    if (r >= 0) this.running.splice(r, 1);
    const w = this.waiting.indexOf(seq);
    if (w >= 0) this.waiting.splice(w, 1);
    this.pool.release(seq.id);
  }

  get idle(): boolean {
    return this.running.length === 0 && this.waiting.length === 0;
  }

  /** Plans the next step and allocates its KV blocks. Entries come in arrival order. */
  schedule(): StepEntry<S>[] {
    const entries: StepEntry<S>[] = [];
    const scheduled = new Set<S>();
    let budget = this.limits.maxBatchTokens;

    // 1. decode rows, oldest first; out of blocks → preempt the youngest
    for (let i = 0; i < this.running.length && budget > 0; i++) {
      const seq = this.running[i]!;
      if (seq.tokens.length - seq.computed !== 1) continue;
      let fits = this.pool.ensure(seq.id, seq.computed + 1);
      while (!fits) {
        const victim = this.youngestUnscheduled(scheduled);
        if (!victim) break;
        this.preempt(victim);
        if (victim === seq) break;
        fits = this.pool.ensure(seq.id, seq.computed + 1);
      }
      if (!this.running.includes(seq)) {
        i--; // it preempted itself; the list shifted
        continue;
      }
      if (!fits) continue;
      entries.push({ seq, start: seq.computed, count: 1, wantsNext: true });
      scheduled.add(seq);
      budget--;
    }

    // 2. prefill chunks of running sequences
    for (const seq of this.running) {
      if (budget <= 0) break;
      const remaining = seq.tokens.length - seq.computed;
      if (remaining <= 1 || scheduled.has(seq)) continue;
      const count = this.fitChunk(seq, Math.min(remaining, budget));
      if (count === 0) continue;
      entries.push({ seq, start: seq.computed, count, wantsNext: seq.computed + count === seq.tokens.length });
      scheduled.add(seq);
      budget -= count;
    }

    // 3. admit waiting sequences, in order; one that cannot get its blocks stops admission (FIFO)
    for (let i = 0; i < this.waiting.length && budget > 0 && this.running.length < this.limits.maxRunningRequests; ) {
      const seq = this.waiting[i]!;
      if (!seq.ready()) {
        i++;
        continue;
      }
      // admit only when the whole known sequence (plus the next token) fits, so it need not be preempted at once
      if (this.pool.blocksFor(seq.tokens.length + 1) > this.pool.freeBlocks + this.pool.table(seq.id).length) break;
      const count = this.fitChunk(seq, Math.min(seq.tokens.length - seq.computed, budget));
      if (count === 0) break;
      this.waiting.splice(i, 1);
      insertById(this.running, seq);
      entries.push({ seq, start: seq.computed, count, wantsNext: seq.computed + count === seq.tokens.length });
      scheduled.add(seq);
      budget -= count;
    }
    if (entries.length === 0 && this.running.some((seq) => seq.tokens.length > seq.computed)) {
      // running prefills that all wait for blocks held by each other: free the youngest and retry
      // (the oldest alone always fits: requests longer than the pool are refused at submission)
      this.preempt(this.running[this.running.length - 1]!);
      return this.schedule();
    }
    entries.sort((p, q) => p.seq.id - q.seq.id);
    return entries;
  }

  /** Marks a step's entries computed (call after the forward pass succeeded). */
  commit(entries: readonly StepEntry<S>[]): void {
    for (const entry of entries) entry.seq.computed = entry.start + entry.count;
  }

  /** Grows the block table for up to `want` new tokens; returns how many fit (0 when none). */
  private fitChunk(seq: S, want: number): number {
    if (this.pool.ensure(seq.id, seq.computed + want)) return want;
    const capacity = (this.pool.table(seq.id).length + this.pool.freeBlocks) * this.pool.blockSize - seq.computed;
    const count = Math.min(want, capacity);
    if (count <= 0) return 0;
    this.pool.ensure(seq.id, seq.computed + count);
    return count;
  }

  private youngestUnscheduled(scheduled: ReadonlySet<S>): S | undefined {
    for (let i = this.running.length - 1; i >= 0; i--) {
      const seq = this.running[i]!;
      if (!scheduled.has(seq)) return seq;
    }
    return undefined;
  }

  private preempt(seq: S): void {
    this.running.splice(this.running.indexOf(seq), 1);
    this.pool.release(seq.id);
    seq.computed = 0;
    seq.preemptions++;
    this.preemptions++;
    insertById(this.waiting, seq);
  }
}

function insertById<S extends ScheduledSequence>(list: S[], seq: S): void {
  let at = list.length;
  while (at > 0 && list[at - 1]!.id > seq.id) at--;
  list.splice(at, 0, seq);
}
