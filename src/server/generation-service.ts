/**
 * Between the routes and the engine: resolves the adapter for the caller (access control, local
 * path confinement), applies LoRAX's token-budget rules, admits the request under the concurrency
 * limit, and starts the engine so that errors before the first token surface as real HTTP errors.
 */
import type { Engine, GenerateEvent, GenerateRequest } from '../engine/engine-types.js';
import { promptTail } from '../engine/prompt-tail.js';
import { isSoppuError, SoppuError } from '../errors/soppu-error.js';
import type { Caller } from './access-control.js';
import { confineAdapterPath, withoutRoots } from './path-confinement.js';
import type { ServerOptions } from './server-options.js';
import type { GenerationCall } from './wire.js';

/**
 * Refuses `text` when it is longer than `limit` tokens of the vocabulary's longest token (`maxTokenChars`):
 * over the limit whatever its tokens, so it is refused before it is tokenized (a 4 MB text held the event
 * loop 9-14 s). Without `maxTokenChars` (a tokenizer that does not tell) nothing is refused here.
 */
export function refuseUntokenizable(text: string, limit: number, maxTokenChars: number | undefined): void {
  if (maxTokenChars === undefined || text.length <= (limit + 2) * maxTokenChars) return;
  throw new SoppuError(
    'VALIDATION',
    `Input validation error: \`inputs\` must have less than ${limit} tokens. Given: ${text.length} characters, more than ${limit} tokens`,
    { field: 'inputs', limit },
  );
}

/** The same body whether the id is missing or belongs to someone else, so ids do not leak. */
export function adapterNotFound(id: string): SoppuError {
  return new SoppuError('ADAPTER_NOT_FOUND', `Adapter '${id}' not found`, { field: 'adapter_id' });
}

/** A started generation whose first event is already known. */
export interface StartedGeneration {
  readonly request: GenerateRequest;
  readonly first: IteratorResult<GenerateEvent>;
  readonly iterator: AsyncIterator<GenerateEvent>;
  /** ms from admission to the first event (queue + prefill). */
  readonly timeToFirstEventMs: number;
  /** Frees the admission slot; safe to call twice. */
  release(): void;
}

export class GenerationService {
  private inFlight = 0;
  private draining = false;

  constructor(
    private readonly engine: Engine,
    private readonly options: ServerOptions,
  ) {}

  get running(): number {
    return this.inFlight;
  }

  /** After this, new generations get 503. */
  startDraining(): void {
    this.draining = true;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  /** Turns a call into an engine request, checking access and LoRAX's token-budget rules. */
  prepare(call: GenerationCall, caller: Caller, signal: AbortSignal): GenerateRequest {
    let adapterId = call.adapterId;
    let adapterPath: string | undefined;
    if (adapterId !== '') {
      if (!caller.mayUse(adapterId)) throw adapterNotFound(adapterId);
      if (call.adapterSource === 'local') {
        // the folder it names must be this caller's by its own name too (`alice-x/../bob-1` is bob-1)
        const confined = confineAdapterPath(adapterId, this.options.adapterDirs, 'adapter_id');
        // a root itself has the id '' (which mayUse reads as the base model): only an admin names it
        if (confined.id === '' ? caller.role !== 'admin' : !caller.mayUse(confined.id)) throw adapterNotFound(adapterId);
        adapterPath = confined.path;
      } else if (!this.engine.hasAdapter(adapterId)) {
        throw adapterNotFound(adapterId);
      }
    } else if (call.adapterSource === 'local') {
      throw new SoppuError('VALIDATION', 'Input validation error: `adapter_source` local needs an `adapter_id` naming the directory', { field: 'adapter_source' });
    }
    const maxInput = this.options.maxInputTokens;
    let promptTokens: number;
    if (call.promptIds) {
      promptTokens = call.promptIds.length; // token ids: the engine checks them against the vocabulary
    } else {
      // with truncate a long prompt is cut, not refused: only the tail its kept tokens lie in is tokenized
      if (call.truncate === undefined) refuseUntokenizable(call.prompt, maxInput, this.engine.info.maxTokenChars);
      const counted = call.truncate === undefined ? call.prompt : promptTail(call.prompt, call.truncate, this.engine.info.maxTokenChars);
      promptTokens = this.engine.tokenize(counted, call.addSpecialTokens).ids.length;
    }
    const inputTokens = call.truncate !== undefined ? Math.min(call.truncate, promptTokens) : promptTokens;
    if (inputTokens > maxInput) {
      throw new SoppuError(
        'VALIDATION',
        `Input validation error: \`inputs\` must have less than ${maxInput} tokens. Given: ${inputTokens}`,
        { field: 'inputs', limit: maxInput },
      );
    }
    const maxTotal = this.options.maxTotalTokens;
    // left out: as many as the request may have, and the KV cache can hold beside its prompt
    const maxNewTokens = call.maxNewTokens ?? Math.max(1, Math.min(maxTotal, this.engine.info.kvCapacityTokens) - inputTokens);
    if (inputTokens + maxNewTokens > maxTotal) {
      throw new SoppuError(
        'VALIDATION',
        `Input validation error: \`inputs\` tokens + \`max_new_tokens\` must be <= ${maxTotal}. Given: ${inputTokens} \`inputs\` tokens and ${maxNewTokens} \`max_new_tokens\``,
        { field: 'max_new_tokens', limit: maxTotal },
      );
    }
    return {
      prompt: call.promptIds ?? call.prompt,
      addSpecialTokens: call.addSpecialTokens,
      adapterId: adapterId === '' ? null : adapterId,
      adapterSource: adapterId === '' ? undefined : call.adapterSource,
      adapterPath,
      maxNewTokens,
      sampling: call.sampling,
      stop: call.stop,
      ignoreEos: call.ignoreEos,
      truncate: call.truncate,
      topAlternatives: call.topAlternatives,
      prefillDetails: call.prefillDetails,
      signal,
    };
  }

  /** Admits (or 429s) and starts the engine; throws what the engine throws before its first event. */
  async start(request: GenerateRequest): Promise<StartedGeneration> {
    if (this.draining) throw new SoppuError('SHUTTING_DOWN', 'Server is shutting down and accepts no new requests');
    const limit = this.options.maxConcurrentRequests;
    if (this.inFlight >= limit) {
      throw new SoppuError('OVERLOADED', `Model is overloaded: ${limit} requests are already in flight (max_concurrent_requests)`, { limit });
    }
    this.inFlight += 1;
    let released = false;
    const release = (): void => {
      if (!released) {
        released = true;
        this.inFlight -= 1;
      }
    };
    const started = performance.now();
    try {
      const iterator = this.engine.generate(request)[Symbol.asyncIterator]();
      const first = await iterator.next();
      return { request, first, iterator, timeToFirstEventMs: performance.now() - started, release };
    } catch (e) {
      release();
      throw request.adapterSource === 'local' ? this.withoutRoots(e) : e;
    }
  }

  /** A local adapter's load error naming its files below the adapter directory, as the request named the folder. */
  private withoutRoots(e: unknown): unknown {
    if (!isSoppuError(e)) return e;
    const roots = this.options.adapterDirs;
    const context = { ...e.context, ...(typeof e.context.file === 'string' ? { file: withoutRoots(e.context.file, roots) } : {}) };
    return new SoppuError(e.code, withoutRoots(e.message, roots), context, { cause: e });
  }
}
