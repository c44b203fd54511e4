/**
 * Prometheus metrics on a per-server Registry (never prom-client's global one, so several servers
 * can live in one process). LoRAX's request metrics keep their names; SOPPU adds per-adapter
 * residency, load/evict counts, queue length, batch size and tokens/s, read from the engine at scrape.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { AdapterStatus, Engine } from '../engine/engine-types.js';
import { TrailingRate } from './trailing-rate.js';

const TIME_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const TOKEN_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

export class ServerMetrics {
  readonly registry = new Registry();
  readonly requestCount: Counter;
  readonly requestSuccess: Counter;
  readonly requestFailure: Counter<'err'>;
  readonly requestDuration: Histogram;
  readonly queueDuration: Histogram;
  readonly validationDuration: Histogram;
  readonly inferenceDuration: Histogram;
  readonly meanTimePerToken: Histogram;
  readonly inputLength: Histogram;
  readonly generatedTokens: Histogram;
  readonly maxNewTokens: Histogram;
  readonly inFlight: Gauge;
  readonly skippedTokens: Histogram;
  readonly inputCount: Histogram;
  /** Generated tokens per second over the last 10 s (sampled each second, the same for every scraper). */
  readonly tokenRate: TrailingRate;
  private readonly unsubscribe: () => void;

  constructor(engine: Engine, inFlight: () => number) {
    const registers = [this.registry];
    // LoRAX's batch metrics, from the engine's steps: a step of continuous batching that holds prompt rows is a
    // "prefill" one (it may hold decode rows too), else "decode"; a request starting its prompt joins the batch
    const stepCount = new Counter({ name: 'lorax_batch_inference_count', help: 'forward steps, by method (prefill: the step holds prompt rows)', labelNames: ['method'], registers });
    const stepSuccess = new Counter({ name: 'lorax_batch_inference_success', help: 'forward steps that succeeded, by method', labelNames: ['method'], registers });
    const stepFailure = new Counter({ name: 'lorax_batch_inference_failure', help: 'forward steps that failed (their requests failed), by method', labelNames: ['method'], registers });
    const stepDuration = new Histogram({ name: 'lorax_batch_inference_duration', help: 'forward step wall time (s), by method', labelNames: ['method'], buckets: TIME_BUCKETS, registers });
    const nextSize = new Histogram({ name: 'lorax_batch_next_size', help: 'requests joining the batch in a step (when any do)', buckets: TOKEN_BUCKETS, registers });
    let currentMaxTokens = 0;
    new Gauge({
      name: 'lorax_batch_current_max_tokens',
      help: 'prompt + max_new_tokens summed over the last step\'s requests (0 when idle)',
      registers,
      collect() {
        this.set(engine.stats().batchSize === 0 ? 0 : currentMaxTokens);
      },
    });
    for (const method of ['prefill', 'decode']) {
      stepCount.inc({ method }, 0);
      stepSuccess.inc({ method }, 0);
      stepFailure.inc({ method }, 0);
    }
    this.unsubscribe =
      engine.onStep?.((step) => {
        stepCount.inc({ method: step.method });
        (step.ok ? stepSuccess : stepFailure).inc({ method: step.method });
        stepDuration.observe({ method: step.method }, step.seconds);
        if (step.joined > 0) nextSize.observe(step.joined);
        currentMaxTokens = step.maxTokens;
      }) ?? (() => undefined);
    this.requestCount = new Counter({ name: 'lorax_request_count', help: 'generation requests received', registers });
    this.requestSuccess = new Counter({ name: 'lorax_request_success', help: 'generation requests that completed', registers });
    this.requestFailure = new Counter({ name: 'lorax_request_failure', help: 'generation requests that failed, by reason', labelNames: ['err'], registers });
    this.requestDuration = new Histogram({ name: 'lorax_request_duration', help: 'request wall time (s)', buckets: TIME_BUCKETS, registers });
    this.queueDuration = new Histogram({ name: 'lorax_request_queue_duration', help: 'time to first token minus validation (s)', buckets: TIME_BUCKETS, registers });
    this.validationDuration = new Histogram({ name: 'lorax_request_validation_duration', help: 'validation time (s)', buckets: TIME_BUCKETS, registers });
    this.inferenceDuration = new Histogram({ name: 'lorax_request_inference_duration', help: 'first to last token (s)', buckets: TIME_BUCKETS, registers });
    this.meanTimePerToken = new Histogram({ name: 'lorax_request_mean_time_per_token_duration', help: 'inference time per generated token (s)', buckets: TIME_BUCKETS, registers });
    this.inputLength = new Histogram({ name: 'lorax_request_input_length', help: 'prompt tokens', buckets: TOKEN_BUCKETS, registers });
    this.generatedTokens = new Histogram({ name: 'lorax_request_generated_tokens', help: 'generated tokens', buckets: TOKEN_BUCKETS, registers });
    this.maxNewTokens = new Histogram({ name: 'lorax_request_max_new_tokens', help: 'max_new_tokens asked for', buckets: TOKEN_BUCKETS, registers });
    this.skippedTokens = new Histogram({ name: 'lorax_request_skipped_tokens', help: 'prompt tokens skipped (none are: details.skipped_tokens is 0)', buckets: TOKEN_BUCKETS, registers });
    this.inputCount = new Histogram({ name: 'lorax_request_input_count', help: 'generations a request asked for (OpenAI n × prompts; 1 on the LoRAX routes)', buckets: TOKEN_BUCKETS, registers });
    this.inFlight = new Gauge({
      name: 'soppu_requests_in_flight',
      help: 'generation requests admitted and not finished',
      registers,
      collect() {
        this.set(inFlight());
      },
    });
    new Gauge({
      name: 'lorax_queue_length',
      help: 'requests waiting in the engine',
      registers,
      collect() {
        this.set(engine.stats().waiting);
      },
    });
    new Gauge({
      name: 'lorax_batch_current_size',
      help: 'requests in the running batch (0 when idle)',
      registers,
      collect() {
        this.set(engine.stats().batchSize);
      },
    });
    new Gauge({
      name: 'soppu_kv_blocks_used',
      help: 'KV-cache blocks in use (of soppu_kv_blocks_total)',
      registers,
      collect() {
        this.set(engine.stats().kvBlocksUsed);
      },
    });
    new Gauge({
      name: 'soppu_kv_blocks_total',
      help: 'KV-cache blocks available',
      registers,
      collect() {
        this.set(engine.stats().kvBlocksTotal);
      },
    });
    const engineCounter = (name: string, help: string, read: () => number): void => {
      new Counter({
        name,
        help,
        registers,
        collect() {
          this.reset();
          this.inc(read());
        },
      });
    };
    engineCounter('soppu_adapter_loads', 'adapters loaded into memory', () => engine.stats().adapterLoads);
    engineCounter('soppu_adapter_evictions', 'adapters evicted from memory', () => engine.stats().adapterEvictions);
    engineCounter('soppu_adapter_cache_hits', 'requests whose adapter was resident', () => engine.stats().adapterHits);
    engineCounter('soppu_adapter_cache_misses', 'requests whose adapter had to be loaded', () => engine.stats().adapterMisses);
    engineCounter('soppu_generated_tokens', 'tokens generated since start', () => engine.stats().generatedTokens);
    new Gauge({
      name: 'soppu_adapter_bytes_resident',
      help: 'bytes of adapter weights in memory',
      registers,
      collect() {
        this.set(engine.stats().adapterBytesResident);
      },
    });
    const tokenRate = (this.tokenRate = new TrailingRate(() => engine.stats().generatedTokens));
    new Gauge({
      name: 'soppu_tokens_per_second',
      help: 'generated tokens per second over the last 10 s',
      registers,
      collect() {
        this.set(tokenRate.perSecond());
      },
    });
    // one listing per scrape for the four gauges below: prom-client calls every collect() in one synchronous
    // pass, and a bank lists thousands of adapters
    let listing: AdapterStatus[] | null = null;
    const adapters = (): AdapterStatus[] => {
      if (listing === null) {
        listing = engine.listAdapters();
        queueMicrotask(() => {
          listing = null;
        });
      }
      return listing;
    };
    // per adapter, only what is in memory or pinned: a bank of thousands (and every folder ever named) would
    // otherwise be a series each, and state in a label makes a new series at every load and eviction
    new Gauge({
      name: 'soppu_adapters',
      help: 'adapters known to the server, by tier (resident, loading, disk, failed)',
      labelNames: ['tier'],
      registers,
      collect() {
        const counts = new Map<string, number>([['resident', 0], ['loading', 0], ['disk', 0], ['failed', 0]]);
        for (const adapter of adapters()) counts.set(adapter.tier, (counts.get(adapter.tier) ?? 0) + 1);
        for (const [tier, count] of counts) this.set({ tier }, count);
      },
    });
    new Gauge({
      name: 'soppu_adapter_resident',
      help: 'per adapter whose weights are in memory: 1 (by storage: compressed or raw)',
      labelNames: ['adapter_id', 'storage'],
      registers,
      collect() {
        this.reset();
        for (const adapter of adapters()) if (adapter.tier === 'resident') this.set({ adapter_id: adapter.id, storage: adapter.storage }, 1);
      },
    });
    new Gauge({
      name: 'soppu_adapter_pinned',
      help: 'per pinned adapter: 1',
      labelNames: ['adapter_id'],
      registers,
      collect() {
        this.reset();
        for (const adapter of adapters()) if (adapter.pinned) this.set({ adapter_id: adapter.id }, 1);
      },
    });
    new Gauge({
      name: 'soppu_adapter_bytes',
      help: 'per adapter whose weights are in memory: their size in bytes',
      labelNames: ['adapter_id'],
      registers,
      collect() {
        this.reset();
        for (const adapter of adapters()) if (adapter.tier === 'resident') this.set({ adapter_id: adapter.id }, adapter.bytes);
      },
    });
  }

  /** Stops the trailing tokens/s sampler and the step subscription (the server closes). */
  close(): void {
    this.tokenRate.close();
    this.unsubscribe();
  }
}
