/**
 * The inference engine: continuous batching of many users' adapters (raw LoRA and compressed bank
 * adapters) in one forward pass per step. The step loop is async and yields to the event loop
 * between steps, so HTTP keeps flowing; the compute of a step is synchronous.
 */
import { SoppuError, isSoppuError } from '../errors/soppu-error.js';
import type { BankReader } from '../compress/bank-reader-types.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { getKernels } from '../kernels/index.js';
import { largePageBuffer } from '../kernels/large-page-buffer.js';
import type { KernelSet } from '../kernels/kernel-set.js';
import { TARGET_MODULES, type TargetModule } from '../model/adapter-hook.js';
import type { ForwardBatch } from '../model/forward-batch.js';
import { ForwardScratch, forward } from '../model/forward.js';
import type { LlamaConfig } from '../model/llama-config.js';
import { loadLlamaModel, modelWeightDtype, type LlamaModel } from '../model/llama-model.js';
import { loadTokenizer } from '../model/tokenizer.js';
import { loadLoraAdapter } from '../io/load-lora-adapter.js';
import { addToBank } from '../compress/bank-add.js';
import { removeFromBank } from '../compress/bank-remove.js';
import { LOCAL_ADAPTER_PREFIX, type BankManifest } from '../compress/bank-manifest.js';
import { Bank, openBank } from '../compress/bank-reader.js';
import { AdapterBatcher, compareAdapters } from './adapter-batch.js';
import { AdapterCache, type AdapterEntry } from './adapter-cache.js';
import type {
  AdapterStatus,
  Engine,
  EngineInfo,
  EngineStats,
  EngineStep,
  FinishReason,
  GenerateEvent,
  GenerateRequest,
  TokenInfo,
} from './engine-types.js';
import { DECODER_CONTEXT_TOKENS, IncrementalDecoder, engineTokenizerOf, type EngineTokenizer } from './engine-tokenizer.js';
import { EventQueue } from './event-queue.js';
import { KvBlockPool } from './kv-block-pool.js';
import { parseSlotPath, residentFromLora, slotKey, type ResidentAdapter, type SlotShape } from './resident-adapter.js';
import { Sampler, resolveSampling, rowKernelsOf, topIndices, type RowKernels } from './sampler.js';
import { promptTail } from './prompt-tail.js';
import { StopWindow } from './stop-window.js';
import { Scheduler, type ScheduledSequence, type StepEntry } from './scheduler.js';
import type { WeightDtype } from '../tensor/dtype.js';

export interface EngineOptions {
  /** Model directory (config.json, safetensors, tokenizer files); or pass `model` and `tokenizer`. */
  readonly modelDir?: string;
  readonly model?: LlamaModel;
  readonly tokenizer?: EngineTokenizer;
  /** Reported as info.modelId (default: the model directory). */
  readonly modelId?: string;
  /** An open bank reader (or null for none); or `bankDir` to open one. */
  readonly bank?: BankReader | null;
  readonly bankDir?: string;
  /** Loads a PEFT directory (default: the io loader). */
  readonly loadLocalAdapter?: (dir: string) => Promise<LoraAdapter>;
  readonly kernels?: KernelSet;
  readonly kvBudgetBytes: number;
  readonly adapterBudgetBytes: number;
  readonly maxBatchTokens: number;
  readonly maxRunningRequests: number;
  readonly maxInputTokens: number;
  readonly maxTotalTokens: number;
  readonly blockSize: number;
  /** Adapter loads in flight at once (default 4). */
  readonly maxConcurrentLoads?: number;
  /**
   * dtype of resident adapter factors (LoRA A, Bᵀ, a bank's shared bases and cores). 16-bit factors halve
   * adapter memory and the LoRA kernels' memory traffic, at one rounding of each factor at load. 'auto'
   * (default): see adapterDtypes.
   */
  readonly loraDtype?: 'auto' | WeightDtype;
  /** Seeds the seeds chosen for requests that give none (default: time based). */
  readonly seed?: number;
}

const LORA_DTYPES = ['auto', 'f32', 'bf16', 'f16'] as const;

/** Checks a loraDtype setting given as text (a CLI flag); throws CONFIG naming `field` and the choices. */
export function parseLoraDtype(value: string, field = 'lora-dtype'): 'auto' | WeightDtype {
  if (!(LORA_DTYPES as readonly string[]).includes(value)) {
    throw new SoppuError('CONFIG', `--${field} must be one of ${LORA_DTYPES.join(', ')}, got "${value}"`, { field });
  }
  return value as 'auto' | WeightDtype;
}

/**
 * The dtypes resident adapters are held in: `local` for PEFT directories, `bank` for a bank's adapters
 * (shared bases, cores, and the members it stores raw). A given loraDtype is both. 'auto': PEFT
 * adapters in the model's dtype, as vLLM's lora_dtype; bank adapters in the model's dtype when it is
 * 16-bit, else bf16. A bank is a fit within an error budget (10 % relative by default), and one bf16
 * rounding of its bases and cores adds ~0.3 % to a slot's relative error (in quadrature: 10 % becomes
 * 10.005 %), while halving the bytes every compressed row's step reads (f32 SmolLM-135M shapes, batch
 * 32, the engine bench's sweep: compressed / base 0.88–0.90 → 0.92). See docs/architecture.md,
 * "Adapters are data".
 */
export function adapterDtypes(modelDtype: WeightDtype, loraDtype: 'auto' | WeightDtype = 'auto'): { local: WeightDtype; bank: WeightDtype } {
  if (loraDtype !== 'auto') return { local: loraDtype, bank: loraDtype };
  return { local: modelDtype, bank: modelDtype === 'f32' ? 'bf16' : modelDtype };
}

/** Loaders that replace the defaults (the model layer's tokenizer, the io layer's PEFT loader, the bank reader). */
export interface EngineDefaults {
  loadTokenizer?: (modelDir: string, config: LlamaConfig) => Promise<EngineTokenizer>;
  loadLocalAdapter?: (dir: string) => Promise<LoraAdapter>;
  openBank?: (dir: string) => Promise<BankReader>;
}

/** One request in flight. */
class RequestState implements ScheduledSequence {
  readonly id: number;
  readonly tokens: number[];
  computed = 0;
  preemptions = 0;
  readonly promptLength: number;
  readonly request: GenerateRequest;
  readonly entry: AdapterEntry | null;
  readonly sampler: Sampler;
  readonly queue = new EventQueue<GenerateEvent>();
  readonly decoder: IncrementalDecoder;
  readonly stops: readonly string[];
  readonly stopWindow: StopWindow;
  text = '';
  /** With a stop matched: the generated text from the stop on (cut off text). */
  stopText = '';
  generated = 0;
  started = false;
  finished = false;
  prefill: TokenInfo[] | null;
  /** With prefillDetails and topAlternatives: each prompt token's top alternatives (the first token's: none). */
  prefillAlternatives: TokenInfo[][] | null;
  distributions: Float32Array[] | null;
  /** Prompt rows whose logits are recorded in prefill (a recompute after preemption skips them). */
  prefillRows = 0;
  /** Removes the request's abort listener from its signal. */
  detachSignal: (() => void) | null = null;
  /** performance.now() at submission, and when a step first computed it (0: not yet). */
  readonly submittedAt = performance.now();
  scheduledAt = 0;

  constructor(id: number, prompt: number[], request: GenerateRequest, entry: AdapterEntry | null, sampler: Sampler, tokenizer: EngineTokenizer) {
    this.id = id;
    this.tokens = prompt;
    this.promptLength = prompt.length;
    this.request = request;
    this.entry = entry;
    this.sampler = sampler;
    this.decoder = new IncrementalDecoder(tokenizer, prompt.slice(-DECODER_CONTEXT_TOKENS));
    this.stops = (request.stop ?? []).filter((s) => s.length > 0);
    this.stopWindow = new StopWindow(this.stops);
    this.prefill = request.prefillDetails ? [] : null;
    this.prefillAlternatives = request.prefillDetails && (request.topAlternatives ?? 0) > 0 ? [] : null;
    this.distributions = request.prefillDetails && request.prefillDistributions ? [] : null;
  }

  /** Ends the generated text at `cut`, where a matched stop starts: the text from there on becomes stopText. */
  cutAtStop(cut: number): void {
    this.stopText = this.text.slice(cut);
    this.text = this.text.slice(0, cut);
  }

  ready(): boolean {
    return this.entry === null || this.entry.state === 'resident';
  }
}

class SoppuEngine implements Engine {
  readonly info: EngineInfo;
  private readonly model: LlamaModel;
  private readonly config: LlamaConfig;
  private readonly kernels: KernelSet;
  /** The sampler's one-row kernels (log Σ exp, argmax), through the kernel set. */
  private readonly rowKernels: RowKernels;
  private readonly tokenizer: EngineTokenizer;
  /** Ids that end a sequence: config.json's and the tokenizer's (generation_config.json, tokenizer_config.json). */
  private readonly eosIds: ReadonlySet<number>;
  private readonly options: EngineOptions;
  private readonly pool: KvBlockPool;
  private readonly scheduler: Scheduler<RequestState>;
  private readonly cache: AdapterCache;
  private readonly batcher: AdapterBatcher;
  private readonly scratch: ForwardScratch;
  private readonly loadLocal: (dir: string) => Promise<LoraAdapter>;
  private readonly openBank: (dir: string) => Promise<BankReader>;
  private bank: BankReader | null;
  /** The last adapter registration or removal; the next one starts after it (inOrder). */
  private adapterChanges: Promise<unknown> = Promise.resolve();
  private readonly slotShape: SlotShape;
  private readonly all = new Set<RequestState>();
  private nextId = 1;
  private seedCounter: number;
  private loopRunning = false;
  private draining = false;
  private closed = false;
  private lastBatchSize = 0;
  private generatedTokens = 0;
  private idleWaiters: (() => void)[] = [];

  constructor(options: EngineOptions, model: LlamaModel, tokenizer: EngineTokenizer, loadLocal: (dir: string) => Promise<LoraAdapter>, reopenBank: (dir: string) => Promise<BankReader>) {
    this.options = options;
    this.bank = options.bank ?? null;
    this.openBank = reopenBank;
    this.model = model;
    this.config = model.config;
    this.kernels = options.kernels ?? getKernels();
    this.rowKernels = rowKernelsOf(this.kernels);
    this.tokenizer = tokenizer;
    this.eosIds = new Set([...this.config.eosTokenIds, ...(tokenizer.eosTokenIds ?? [])]);
    this.loadLocal = loadLocal;
    checkLimits(options, this.config);
    this.pool = new KvBlockPool(
      { layers: this.config.numLayers, kvHeads: this.config.numKvHeads, headDim: this.config.headDim, blockSize: options.blockSize },
      options.kvBudgetBytes,
    );
    this.scheduler = new Scheduler<RequestState>(this.pool, { maxBatchTokens: options.maxBatchTokens, maxRunningRequests: options.maxRunningRequests });
    this.slotShape = slotShapeOf(this.config);
    const modelDtype = modelWeightDtype(model);
    const dtypes = adapterDtypes(modelDtype, options.loraDtype);
    this.cache = new AdapterCache({
      budgetBytes: options.adapterBudgetBytes,
      bank: options.bank ?? null,
      loadLocal,
      slotShape: this.slotShape,
      factorDtype: dtypes.local,
      bankFactorDtype: dtypes.bank,
      allocateBases: largePageBuffer,
      maxConcurrentLoads: options.maxConcurrentLoads,
      onSettled: () => this.onAdapterSettled(),
    });
    // every slot a forward step asks for: a new batch composition has its plans built at once
    const slotKeys: string[] = [];
    for (let layer = 0; layer < this.config.numLayers; layer++) {
      for (const module of TARGET_MODULES) if (this.slotShape(layer, module)) slotKeys.push(slotKey(layer, module));
    }
    this.batcher = new AdapterBatcher(slotKeys, this.kernels);
    this.scratch = new ForwardScratch(this.config, 1);
    this.seedCounter = options.seed ?? (Date.now() >>> 0);
    this.info = {
      modelId: options.modelId ?? options.modelDir ?? 'model',
      modelDtype,
      loraDtype: dtypes.local,
      bankDtype: dtypes.bank,
      maxInputTokens: options.maxInputTokens,
      maxTotalTokens: options.maxTotalTokens,
      maxBatchTokens: options.maxBatchTokens,
      kvCapacityTokens: this.pool.totalBlocks * this.pool.blockSize,
      eosTokenIds: [...this.eosIds].sort((a, b) => a - b),
      kernel: this.kernels.name,
      ...(tokenizer.maxTokenChars !== undefined ? { maxTokenChars: tokenizer.maxTokenChars } : {}),
    };
  }

  // ---------------------------------------------------------------- requests

  generate(request: GenerateRequest): AsyncIterable<GenerateEvent> {
    // an async generator: a submit error is thrown from the first next()
    const engine = this;
    return (async function* events(): AsyncGenerator<GenerateEvent> {
      const state = engine.submit(request);
      try {
        for await (const event of state.queue) yield event;
      } finally {
        if (!state.finished) engine.cancel(state);
      }
    })();
  }

  private submit(request: GenerateRequest): RequestState {
    if (this.closed || this.draining) throw new SoppuError('SHUTTING_DOWN', 'the engine is draining and accepts no new requests');
    if (request.signal?.aborted) throw new SoppuError('CANCELLED', 'the request was cancelled before it started');
    const maxNew = request.maxNewTokens;
    if (!Number.isInteger(maxNew) || maxNew < 1) {
      throw new SoppuError('VALIDATION', `max_new_tokens must be a positive integer, got ${String(maxNew)}`, { field: 'max_new_tokens', limit: '>= 1' });
    }
    // with truncate, a text is tokenized from the tail its last tokens lie in
    const text = typeof request.prompt === 'string' && request.truncate !== undefined ? promptTail(request.prompt, request.truncate, this.tokenizer.maxTokenChars) : request.prompt;
    let prompt = this.promptIds(text, request.addSpecialTokens ?? true);
    if (request.truncate !== undefined) {
      if (!Number.isInteger(request.truncate) || request.truncate < 1) {
        throw new SoppuError('VALIDATION', `truncate must be a positive integer, got ${String(request.truncate)}`, { field: 'truncate', limit: '>= 1' });
      }
      if (prompt.length > request.truncate) prompt = prompt.slice(prompt.length - request.truncate);
    }
    if (prompt.length === 0) throw new SoppuError('VALIDATION', 'the prompt is empty', { field: 'inputs' });
    const { maxInputTokens, maxTotalTokens } = this.options;
    if (prompt.length > maxInputTokens) {
      throw new SoppuError('VALIDATION', `the prompt has ${prompt.length} tokens, more than max_input_tokens ${maxInputTokens}`, { field: 'inputs', limit: maxInputTokens });
    }
    if (prompt.length + maxNew > maxTotalTokens) {
      throw new SoppuError(
        'VALIDATION',
        `prompt tokens (${prompt.length}) + max_new_tokens (${maxNew}) must be <= max_total_tokens ${maxTotalTokens}`,
        { field: 'max_new_tokens', limit: maxTotalTokens - prompt.length },
      );
    }
    const capacity = this.pool.totalBlocks * this.pool.blockSize;
    if (prompt.length + maxNew > capacity) {
      throw new SoppuError('VALIDATION', `prompt tokens + max_new_tokens (${prompt.length + maxNew}) exceed the KV cache capacity of ${capacity} tokens`, {
        field: 'max_new_tokens',
        limit: Math.max(0, capacity - prompt.length),
      });
    }
    const topAlternatives = request.topAlternatives ?? 0;
    if (!Number.isInteger(topAlternatives) || topAlternatives < 0 || topAlternatives > 100) {
      throw new SoppuError('VALIDATION', `top_n_tokens must be an integer in [0, 100], got ${String(topAlternatives)}`, { field: 'top_n_tokens', limit: 100 });
    }
    if (request.stop && request.stop.length > 16) {
      throw new SoppuError('VALIDATION', `at most 16 stop sequences are allowed, got ${request.stop.length}`, { field: 'stop', limit: 16 });
    }
    const settings = resolveSampling(request.sampling);
    const seed = request.sampling?.seed ?? this.nextSeed();
    const entry = this.acquireAdapter(request);
    const state = new RequestState(this.nextId++, prompt, request, entry, new Sampler(settings, seed, prompt, this.rowKernels), this.tokenizer);
    this.all.add(state);
    this.scheduler.add(state);
    const signal = request.signal;
    if (signal) {
      const onAbort = (): void => {
        if (!state.finished) this.cancel(state);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      // removed when the request ends: a long-lived signal shared by many requests must not hold them all
      state.detachSignal = () => signal.removeEventListener('abort', onAbort);
    }
    this.wake();
    return state;
  }

  private promptIds(prompt: string | readonly number[], addSpecialTokens: boolean): number[] {
    const vocab = this.config.vocabSize;
    if (typeof prompt === 'string') {
      const ids = this.tokenizer.encode(prompt, addSpecialTokens);
      // a tokenizer may hold tokens the embedding lacks (a <pad> added without resizing): refused here, the
      // forward step would fail every request of the batch
      const outside = ids.findIndex((id) => id >= vocab);
      if (outside >= 0) {
        throw new SoppuError(
          'VALIDATION',
          `prompt token ${outside} (id ${ids[outside]!}, ${JSON.stringify(this.tokenizer.decode([ids[outside]!], false))}) is outside the model's vocabulary [0, ${vocab}): the tokenizer has tokens the model's embeddings lack`,
          { field: 'inputs', limit: vocab },
        );
      }
      return ids;
    }
    if (!Array.isArray(prompt)) throw new SoppuError('VALIDATION', 'the prompt must be text or a list of token ids', { field: 'inputs' });
    return prompt.map((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= vocab) {
        throw new SoppuError('VALIDATION', `prompt token ${i} is ${String(id)}, outside the vocabulary [0, ${vocab})`, { field: 'inputs', limit: vocab });
      }
      return id;
    });
  }

  private acquireAdapter(request: GenerateRequest): AdapterEntry | null {
    const id = request.adapterId ?? '';
    if (id === '') return null;
    if (request.adapterSource === 'local') {
      const dir = request.adapterPath;
      if (!dir) throw new SoppuError('VALIDATION', `adapter ${id}: adapter_source "local" needs a directory path`, { field: 'adapter_id' });
      // keyed by its directory, apart from registered and bank ids: a caller naming a local folder after
      // another adapter's id must not replace that adapter for everyone else
      const key = localAdapterKey(dir);
      if (!this.cache.peek(key)) this.cache.register(key, { source: 'local', dir });
      return this.cache.acquire(key);
    }
    return this.cache.acquire(id);
  }

  private nextSeed(): number {
    this.seedCounter = (Math.imul(this.seedCounter ^ (this.seedCounter >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0;
    return this.seedCounter;
  }

  /** Ends a request that was cancelled (by its signal or by the caller abandoning the iterator). */
  private cancel(state: RequestState): void {
    this.finish(state, null, new SoppuError('CANCELLED', `request ${state.id} was cancelled`));
    this.wake();
  }

  private finish(state: RequestState, reason: FinishReason | null, error?: unknown): void {
    if (state.finished) return;
    state.finished = true;
    state.detachSignal?.();
    this.scheduler.remove(state);
    this.all.delete(state);
    if (reason) {
      let tail = state.decoder.flush();
      // the text the decoder held back (an unfinished character at the end) is checked for stops too
      if (reason !== 'stop_sequence' && tail !== '' && state.stops.length > 0) {
        const cut = state.stopWindow.pushTail(tail);
        if (cut !== null) {
          state.text += tail;
          tail = '';
          state.cutAtStop(cut);
          reason = 'stop_sequence';
        }
      }
      const stopped = reason === 'stop_sequence';
      const text = stopped ? state.text : state.text + tail;
      state.queue.push({
        type: 'done',
        finishReason: reason,
        generatedText: text,
        promptTokens: state.promptLength,
        generatedTokens: state.generated,
        seed: state.sampler.settings.sample ? state.sampler.seed : null,
        queueMs: state.scheduledAt > 0 ? state.scheduledAt - state.submittedAt : 0,
        ...(stopped && state.stopWindow.stopToken !== null ? { stopToken: state.stopWindow.stopToken } : {}),
        ...(stopped ? { stopText: state.stopText + tail } : {}),
        ...(state.prefill ? { prefill: state.prefill } : {}),
        ...(state.prefillAlternatives ? { prefillAlternatives: state.prefillAlternatives } : {}),
        ...(state.distributions ? { prefillDistributions: state.distributions } : {}),
      });
      state.queue.close();
    } else {
      state.queue.fail(error);
    }
    // last: releasing may drop a replaced registration, whose release callback the caller supplies
    if (state.entry) this.cache.release(state.entry);
    if (this.all.size === 0) this.notifyIdle();
  }

  // ---------------------------------------------------------------- step loop

  private wake(): void {
    if (this.loopRunning || this.closed) return;
    this.loopRunning = true;
    setImmediate(() => void this.loop());
  }

  private onAdapterSettled(): void {
    // fail the requests whose adapter failed to load; the others may now be scheduled
    for (const state of [...this.all]) {
      if (state.entry?.state === 'failed' && !state.started) this.finish(state, null, state.entry.error);
    }
    this.wake();
  }

  private async loop(): Promise<void> {
    try {
      while (!this.closed) {
        for (const state of [...this.all]) {
          if (state.entry?.state === 'failed' && !state.started) this.finish(state, null, state.entry.error);
        }
        if (this.scheduler.idle) {
          this.lastBatchSize = 0; // no batch runs now
          break;
        }
        const entries = this.scheduler.schedule();
        if (entries.length === 0) break; // waiting for adapter loads; onSettled wakes the loop
        try {
          this.step(entries);
        } catch (e) {
          // a fault after the forward pass (emitting, finishing): the step's requests fail, the engine goes on
          const error = isSoppuError(e) ? e : new SoppuError('GENERATION', `generation step failed: ${e instanceof Error ? e.message : String(e)}`, {}, { cause: e });
          for (const entry of entries) this.finish(entry.seq, null, error);
        }
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.loopRunning = false;
    }
  }

  private readonly stepListeners = new Set<(step: EngineStep) => void>();

  onStep(listener: (step: EngineStep) => void): () => void {
    this.stepListeners.add(listener);
    return () => void this.stepListeners.delete(listener);
  }

  /** Tells the step listeners about a step over `entries` that started at `startedAt` (performance.now()). */
  private reportStep(entries: readonly StepEntry<RequestState>[], startedAt: number, ok: boolean): void {
    if (this.stepListeners.size === 0) return;
    let prefill = false;
    let joined = 0;
    let maxTokens = 0;
    for (const entry of entries) {
      if (entry.start < entry.seq.promptLength) prefill = true;
      if (entry.start === 0) joined++;
      maxTokens += entry.seq.promptLength + entry.seq.request.maxNewTokens;
    }
    const step: EngineStep = { method: prefill ? 'prefill' : 'decode', ok, seconds: (performance.now() - startedAt) / 1000, requests: entries.length, joined, maxTokens };
    for (const listener of this.stepListeners) {
      try {
        listener(step);
      } catch (e) {
        // an observer's fault is not the step's requests'
        process.emitWarning(`engine step listener failed: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }

  /** One forward step over `entries` (synchronous compute). */
  private step(entries: StepEntry<RequestState>[]): void {
    const startedAt = performance.now();
    for (const entry of entries) if (entry.seq.scheduledAt === 0) entry.seq.scheduledAt = startedAt;
    // rows of one adapter (and of one cluster) contiguous; ties by arrival
    const ordered = [...entries].sort(
      (p, q) => compareAdapters(p.seq.entry?.resident ?? null, q.seq.entry?.resident ?? null) || p.seq.id - q.seq.id,
    );
    const batch = this.buildBatch(ordered);
    const rowAdapters = ordered.flatMap((e) => new Array<ResidentAdapter | null>(e.count).fill(e.seq.entry?.resident ?? null));
    let logits: Float32Array;
    try {
      const hook = this.batcher.hook(rowAdapters);
      logits = forward(this.model, this.kernels, batch.forward, this.pool.storage, hook, this.scratch);
    } catch (e) {
      const error = isSoppuError(e) ? e : new SoppuError('GENERATION', `forward step failed: ${e instanceof Error ? e.message : String(e)}`, {}, { cause: e });
      for (const entry of ordered) this.finish(entry.seq, null, error);
      this.reportStep(ordered, startedAt, false);
      return;
    }
    this.lastBatchSize = ordered.length; // requests in the batch, as LoRAX's batch size
    this.scheduler.commit(ordered);
    const vocab = this.config.vocabSize;
    try {
      for (let i = 0; i < ordered.length; i++) {
        const entry = ordered[i]!;
        const state = entry.seq;
        const rows = batch.logitRowsOf[i]!;
        if (batch.allRowsOf[i]) this.recordPrefill(state, entry, logits, rows);
        if (!entry.wantsNext || state.finished) continue;
        const row = rows[rows.length - 1]!;
        this.emitToken(state, logits.subarray(row * vocab, (row + 1) * vocab));
      }
    } catch (e) {
      this.reportStep(ordered, startedAt, false); // the loop fails the step's requests
      throw e;
    }
    this.reportStep(ordered, startedAt, true);
  }

  private buildBatch(ordered: readonly StepEntry<RequestState>[]): { forward: ForwardBatch; logitRowsOf: number[][]; allRowsOf: boolean[] } {
    const m = ordered.reduce((n, e) => n + e.count, 0);
    const tokens = new Int32Array(m);
    const positions = new Int32Array(m);
    const seqs = ordered.length;
    const qStart = new Int32Array(seqs);
    const qLen = new Int32Array(seqs);
    const ctxLen = new Int32Array(seqs);
    const blockTableStart = new Int32Array(seqs);
    const table: number[] = [];
    const logitRows: number[] = [];
    const logitRowsOf: number[][] = [];
    const allRowsOf: boolean[] = [];
    let row = 0;
    ordered.forEach((entry, s) => {
      const state = entry.seq;
      qStart[s] = row;
      qLen[s] = entry.count;
      ctxLen[s] = entry.start + entry.count;
      blockTableStart[s] = table.length;
      table.push(...this.pool.table(state.id));
      // prompt logprobs need every prompt row's logits, until each prompt row is recorded (a one-row chunk and
      // the rows a preemption's recompute reaches for the first time included)
      const allRows = state.prefill !== null && state.generated === 0 && entry.start + entry.count > state.prefillRows;
      allRowsOf.push(allRows);
      const mine: number[] = [];
      for (let i = 0; i < entry.count; i++) {
        tokens[row] = state.tokens[entry.start + i]!;
        positions[row] = entry.start + i;
        if (allRows || (entry.wantsNext && i === entry.count - 1)) {
          mine.push(logitRows.length);
          logitRows.push(row);
        }
        row++;
      }
      logitRowsOf.push(mine);
    });
    return {
      forward: { tokens, positions, seqs, qStart, qLen, ctxLen, blockTable: Int32Array.from(table), blockTableStart, logitRows: Int32Array.from(logitRows) },
      logitRowsOf,
      allRowsOf,
    };
  }

  /**
   * Prompt logprobs: logits of row p − 1 score prompt token p (the first token has none); with
   * prefillDistributions, also the whole log-softmax of every prompt row.
   */
  private recordPrefill(state: RequestState, entry: StepEntry<RequestState>, logits: Float32Array, rows: readonly number[]): void {
    const prefill = state.prefill!;
    const vocab = this.config.vocabSize;
    const recorded = state.prefillRows;
    state.prefillRows = Math.max(recorded, Math.min(state.promptLength, entry.start + entry.count));
    if (entry.start === 0 && recorded === 0) {
      prefill.push(this.tokenInfo(state.tokens[0]!, Number.NaN));
      state.prefillAlternatives?.push([]);
    }
    for (let i = 0; i < entry.count; i++) {
      if (entry.start + i < recorded) continue; // recorded before a preemption
      if (entry.start + i >= state.promptLength) break;
      const position = entry.start + i + 1;
      const wantsLogprob = position < state.promptLength;
      if (!wantsLogprob && !state.distributions) break;
      // row: [vocab]; log-softmax = row − logsumexp(row), the normalizer computed once per row
      const row = logits.subarray(rows[i]! * vocab, (rows[i]! + 1) * vocab);
      const normalizer = this.rowKernels.logSumExp(row);
      if (state.distributions) state.distributions.push(row.map((value) => value - normalizer));
      if (wantsLogprob) {
        const id = state.tokens[position]!;
        prefill.push(this.tokenInfo(id, row[id]! - normalizer));
        // the most likely tokens at this position, by the model's own distribution
        if (state.prefillAlternatives) {
          state.prefillAlternatives.push(topIndices(row, state.request.topAlternatives!).map((top) => this.tokenInfo(top, row[top]! - normalizer)));
        }
      }
    }
  }

  private tokenInfo(id: number, logprob: number): TokenInfo {
    return { id, text: this.tokenizer.decode([id], false), logprob, special: this.tokenizer.isSpecial(id) };
  }

  private emitToken(state: RequestState, logitRow: Float32Array): void {
    const request = state.request;
    const sampled = state.sampler.sample(logitRow, request.topAlternatives ?? 0);
    state.sampler.observe(sampled.id);
    state.tokens.push(sampled.id);
    state.generated++;
    state.started = true;
    this.generatedTokens++;
    const special = this.tokenizer.isSpecial(sampled.id);
    const piece = state.decoder.push(sampled.id);
    state.text += piece;
    const token: TokenInfo = { id: sampled.id, text: special ? this.tokenizer.decode([sampled.id], false) : piece, logprob: sampled.logprob, special };
    const eos = !request.ignoreEos && this.eosIds.has(sampled.id);
    // an eos ends the request first; else a stop that this token completes (its cut rides on the token's event)
    const cut = !eos && state.stops.length > 0 ? state.stopWindow.push(piece, special ? token.text : null) : null;
    state.queue.push({
      type: 'token',
      token,
      ...(request.topAlternatives ? { alternatives: sampled.alternatives.map((a) => this.tokenInfo(a.id, a.logprob)) } : {}),
      ...(cut !== null ? { stopCut: cut } : {}),
    });
    if (eos) {
      this.finish(state, 'eos_token');
      return;
    }
    if (cut !== null) {
      state.cutAtStop(cut);
      this.finish(state, 'stop_sequence');
      return;
    }
    if (state.generated >= request.maxNewTokens) this.finish(state, 'length');
  }

  // ---------------------------------------------------------------- text

  tokenize(text: string, addSpecialTokens = true): { ids: number[]; tokens: { id: number; text: string; start: number; stop: number }[] } {
    const tokens = this.tokenizer.tokenizeWithOffsets(text, addSpecialTokens);
    return { ids: tokens.map((t) => t.id), tokens };
  }

  tokenBytes(id: number): readonly number[] {
    return this.tokenizer.tokenBytes?.(id) ?? [...Buffer.from(this.tokenizer.decode([id], false), 'utf8')];
  }

  detokenize(ids: readonly number[]): string {
    return this.tokenizer.decode(ids, true);
  }

  applyChatTemplate(messages: readonly { role: string; content: string }[], addGenerationPrompt = true): string {
    return this.tokenizer.applyChatTemplate(messages, addGenerationPrompt);
  }

  // ---------------------------------------------------------------- adapters

  listAdapters(): AdapterStatus[] {
    return this.cache.ids().map((id) => this.statusOf(id));
  }

  hasAdapter(id: string): boolean {
    return this.cache.has(id);
  }

  private statusOf(id: string): AdapterStatus {
    const entry = this.cache.peek(id);
    const source = entry?.spec.source ?? 'bank';
    const tier = entry ? (entry.state === 'resident' ? 'resident' : entry.state === 'loading' ? 'loading' : entry.state === 'failed' ? 'failed' : 'disk') : 'disk';
    return {
      id,
      source,
      // before it loads, a bank adapter's storage is what the bank holds of it: raw when no slot is compressed
      storage: entry?.resident?.storage ?? (source === 'local' ? 'raw' : this.bank?.hasCompressedSlots && !this.bank.hasCompressedSlots(id) ? 'raw' : 'compressed'),
      tier,
      pinned: entry?.pinned ?? false,
      bytes: entry?.resident?.bytes ?? entry?.knownBytes ?? 0,
      ...(entry?.error ? { error: entry.error.message } : {}),
    };
  }

  /**
   * Registers `id` from the PEFT directory `dir`, replacing (hot reload) an adapter of that id: requests
   * already holding the old one finish with it. With `compress`, the adapter is projected onto the bank's
   * shared bases and written into the bank (replacing the bank's adapter of that id), then served from it.
   * `onRelease` is called once the engine will not read `dir` again: right after a compress registration,
   * else when the registration is removed or replaced and no request holds it (so the caller may then delete
   * the directory). It is not called when registration throws.
   */
  async registerAdapter(id: string, dir: string, options?: { compress?: boolean; ignoreBaseModel?: boolean; onRelease?: () => void }): Promise<AdapterStatus> {
    return this.inOrder(() => this.registerNow(id, dir, options));
  }

  private async registerNow(id: string, dir: string, options?: { compress?: boolean; ignoreBaseModel?: boolean; onRelease?: () => void }): Promise<AdapterStatus> {
    if (id.length === 0) throw new SoppuError('VALIDATION', 'adapter id must not be empty', { field: 'adapter_id' });
    // load and check now (in the dtype it will be served in), so a bad directory is reported to whoever registers it
    const adapter = await this.loadLocal(dir);
    residentFromLora(id, adapter, this.slotShape, options?.compress ? this.info.bankDtype : this.info.loraDtype);
    if (options?.compress) {
      // projected onto the bank's shared bases and written into the bank, then served compressed
      const bank = this.bank;
      if (!bank) throw new SoppuError('CONFIG', `adapter ${id}: compress needs an open bank (the engine has none)`, { field: 'compress' });
      await this.changeBank(bank.dir, (keep) => addToBank(bank.dir, id, adapter, { replace: true, keep, ignoreBaseModel: options.ignoreBaseModel === true }));
      options.onRelease?.();
      // a local registration of the id would shadow the bank's new version: it goes, its pin (as it is now: one
      // made while the bank was written holds) passing to the bank's entry. A bank entry needs nothing: the
      // reopened bank made it stale and carried its pin (removing it too loaded the new version twice)
      const entry = this.cache.peek(id);
      if (entry?.spec.source === 'local') {
        this.cache.remove(id);
        if (entry.pinned) this.cache.pin(id, true);
      }
      return this.statusOf(id);
    }
    const pinned = this.cache.peek(id)?.pinned ?? false;
    this.cache.register(id, { source: 'local', dir }, options?.onRelease);
    if (pinned) this.cache.pin(id, true);
    return this.statusOf(id);
  }

  /**
   * Removes `id`: a registration (the bank's adapter of that id, if any, then serves again), or else the
   * bank's adapter itself, from the bank on disk. Requests already holding it finish with it.
   */
  async removeAdapter(id: string): Promise<void> {
    return this.inOrder(() => this.removeNow(id));
  }

  private async removeNow(id: string): Promise<void> {
    if (!this.cache.has(id)) throw new SoppuError('ADAPTER_NOT_FOUND', `adapter ${id} is not registered`, { field: 'adapter_id' });
    const registered = this.cache.peek(id)?.spec.source === 'local';
    const bank = this.bank;
    if (!registered && bank?.has(id)) await this.changeBank(bank.dir, (keep) => removeFromBank(bank.dir, id, { keep }));
    this.cache.remove(id);
  }

  /** Runs `write` (a change of the bank in `bankDir`), then reopens the bank for serving. */
  private async changeBank(bankDir: string, write: (keep: readonly BankManifest[]) => Promise<unknown>): Promise<void> {
    // the manifests of older readers that held requests still load from, and the open one's (after a change made
    // outside the server, the disk's previous manifest is not the one this server reads): their files stay
    const readers = [...this.cache.readersStillNeeded(), ...(this.bank ? [this.bank] : [])];
    const keep = readers.flatMap((reader) => (reader instanceof Bank ? [reader.manifest] : []));
    await write(keep);
    await this.reopenBank(bankDir);
  }

  /** Opens the bank in `bankDir` again and serves from it. */
  private async reopenBank(bankDir: string): Promise<BankReader> {
    const bank = await this.openBank(bankDir);
    this.bank = bank;
    this.cache.setBank(bank);
    return bank;
  }

  /**
   * Reads the bank again from disk (after `soppu bank add/rm/refit` changed it): new ids are served, removed ones
   * are not found, and adapters whose weights changed load their new version (requests holding the old one
   * finish with it). Runs in order with registrations and removals.
   */
  async reloadBank(): Promise<{ adapters: number }> {
    return this.inOrder(async () => {
      const bank = this.bank;
      if (!bank) throw new SoppuError('CONFIG', 'the engine serves no bank: there is none to reload', { field: 'bank' });
      return { adapters: (await this.reopenBank(bank.dir)).ids().length };
    });
  }

  /**
   * Runs adapter registrations and removals one at a time, in call order: each reads a directory or writes
   * the bank before it takes effect, and without the queue the one that finished last won (a removal sent
   * during a registration's load was undone by it; a bank change's reopen could land after a later one's).
   */
  private inOrder<T>(change: () => Promise<T>): Promise<T> {
    const run = this.adapterChanges.catch(() => undefined).then(change);
    this.adapterChanges = run;
    return run;
  }

  async pinAdapter(id: string, pinned: boolean): Promise<void> {
    this.cache.pin(id, pinned);
  }

  // ---------------------------------------------------------------- lifecycle

  stats(): EngineStats {
    return {
      running: this.scheduler.running.length,
      waiting: this.scheduler.waiting.length,
      batchSize: this.lastBatchSize,
      kvBlocksUsed: this.pool.usedBlocks,
      kvBlocksTotal: this.pool.totalBlocks,
      adapterHits: this.cache.counts.hits,
      adapterMisses: this.cache.counts.misses,
      adapterLoads: this.cache.counts.loads,
      adapterEvictions: this.cache.counts.evictions,
      adapterBytesResident: this.cache.bytesResident,
      generatedTokens: this.generatedTokens,
    };
  }

  /** Preemptions so far (benchmarks and tests). */
  get preemptions(): number {
    return this.scheduler.preemptions;
  }

  private notifyIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const resolve of waiters) resolve();
  }

  async drain(deadlineMs: number): Promise<void> {
    this.draining = true;
    if (this.all.size > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(0, deadlineMs));
        this.idleWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    for (const state of [...this.all]) this.finish(state, null, new SoppuError('SHUTTING_DOWN', `request ${state.id} was cancelled: the engine is shutting down`));
  }

  async close(): Promise<void> {
    await this.drain(0);
    this.closed = true;
  }
}

/**
 * The cache key (and listed id) of an adapter a request names by directory (adapter_source "local"). No
 * registered id (ADAPTER_ID_PATTERN: a letter or digit first) or bank id (checkAdapterId) has its prefix.
 */
export function localAdapterKey(dir: string): string {
  return `${LOCAL_ADAPTER_PREFIX}${dir}`;
}

/** The base linear shapes adapters must match. */
export function slotShapeOf(config: LlamaConfig): SlotShape {
  const dModel = config.hiddenSize;
  const qDim = config.numHeads * config.headDim;
  const kvDim = config.numKvHeads * config.headDim;
  const dFfn = config.intermediateSize;
  const shapes: Record<TargetModule, { inFeatures: number; outFeatures: number }> = {
    q_proj: { inFeatures: dModel, outFeatures: qDim },
    k_proj: { inFeatures: dModel, outFeatures: kvDim },
    v_proj: { inFeatures: dModel, outFeatures: kvDim },
    o_proj: { inFeatures: qDim, outFeatures: dModel },
    gate_proj: { inFeatures: dModel, outFeatures: dFfn },
    up_proj: { inFeatures: dModel, outFeatures: dFfn },
    down_proj: { inFeatures: dFfn, outFeatures: dModel },
  };
  return (layer, module) => (layer >= 0 && layer < config.numLayers ? shapes[module] : null);
}

/**
 * A bank made for another model is refused when the engine starts, naming a slot that does not fit: one of
 * the model's layers with another shape, or no slot that is a layer of the model at all. Otherwise the server
 * would list its adapters and fail every request that names one. A slot that is no layer of the model (one
 * adapter's lm_head) fails only the adapters that have it, when they load.
 */
function checkBankFitsModel(bank: BankReader, shape: SlotShape): void {
  const slots = bank.slotShapes ?? [];
  let fitting = 0;
  for (const slot of slots) {
    const parsed = parseSlotPath(slot.path);
    const expected = parsed ? shape(parsed.layer, parsed.module) : null;
    if (!expected) continue;
    if (expected.inFeatures !== slot.inFeatures || expected.outFeatures !== slot.outFeatures) {
      throw new SoppuError(
        'ADAPTER_INCOMPATIBLE',
        `bank ${bank.dir} does not fit this model: its slot ${slot.path} is [${slot.outFeatures}, ${slot.inFeatures}] (out, in), the model's is [${expected.outFeatures}, ${expected.inFeatures}]`,
        { file: bank.dir, tensor: slot.path },
      );
    }
    fitting++;
  }
  if (slots.length > 0 && fitting === 0) {
    throw new SoppuError('ADAPTER_INCOMPATIBLE', `bank ${bank.dir} does not fit this model: none of its slots (${slots[0]!.path}, …) is a linear layer of the model`, { file: bank.dir, tensor: slots[0]!.path });
  }
}

function checkLimits(options: EngineOptions, config: LlamaConfig): void {
  const positive = (field: keyof EngineOptions): number => {
    const value = options[field];
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
      throw new SoppuError('CONFIG', `engine option ${field} must be a positive integer, got ${String(value)}`, { field, limit: '>= 1' });
    }
    return value;
  };
  for (const field of ['maxBatchTokens', 'maxRunningRequests', 'maxInputTokens', 'maxTotalTokens', 'blockSize'] as const) positive(field);
  if (options.maxConcurrentLoads !== undefined) positive('maxConcurrentLoads'); // 0 loads at once: every adapter request waits forever
  if (options.maxInputTokens >= options.maxTotalTokens) {
    throw new SoppuError('CONFIG', `max_input_tokens (${options.maxInputTokens}) must be < max_total_tokens (${options.maxTotalTokens})`, {
      field: 'maxInputTokens',
      limit: options.maxTotalTokens,
    });
  }
  if (options.maxTotalTokens > config.maxPositionEmbeddings) {
    throw new SoppuError('CONFIG', `max_total_tokens (${options.maxTotalTokens}) exceeds the model's max_position_embeddings ${config.maxPositionEmbeddings}`, {
      field: 'maxTotalTokens',
      limit: config.maxPositionEmbeddings,
    });
  }
  if (!(options.adapterBudgetBytes >= 0) || !(options.kvBudgetBytes > 0)) {
    throw new SoppuError('CONFIG', 'engine budgets kvBudgetBytes (> 0) and adapterBudgetBytes (>= 0) must be byte counts', { field: 'kvBudgetBytes' });
  }
}

/**
 * Creates an engine. The model comes from `model` or `modelDir`; the tokenizer and the PEFT loader
 * from the options or `defaults` (the model and io layers' loaders).
 */
export async function createEngine(options: EngineOptions, defaults: EngineDefaults = {}): Promise<Engine & { readonly preemptions: number }> {
  let model = options.model;
  if (!model) {
    if (!options.modelDir) throw new SoppuError('CONFIG', 'createEngine needs modelDir or model', { field: 'modelDir' });
    model = await loadLlamaModel(options.modelDir);
  }
  let tokenizer = options.tokenizer;
  if (!tokenizer) {
    if (!options.modelDir) throw new SoppuError('CONFIG', 'createEngine needs a tokenizer or a modelDir holding tokenizer.json', { field: 'tokenizer' });
    const config = model.config;
    const load = defaults.loadTokenizer ?? (async (dir: string) => engineTokenizerOf(await loadTokenizer(dir, config)));
    tokenizer = await load(options.modelDir, config);
  }
  const open = defaults.openBank ?? openBank;
  let bank = options.bank ?? null;
  if (!bank && options.bankDir) bank = await open(options.bankDir);
  if (bank) checkBankFitsModel(bank, slotShapeOf(model.config));
  const loadLocal = options.loadLocalAdapter ?? defaults.loadLocalAdapter ?? ((dir: string) => loadLoraAdapter(dir));
  return new SoppuEngine({ ...options, bank }, model, tokenizer, loadLocal, open);
}
