/**
 * The engine's public API, which the server and the CLI build on. Internals are camelCase; the
 * server translates to LoRAX/OpenAI snake_case in one place.
 */
import type { WeightDtype } from '../tensor/dtype.js';

export interface SamplingParams {
  /** 0 or undefined with doSample false → greedy. */
  readonly temperature?: number;
  readonly topK?: number;
  readonly topP?: number;
  readonly typicalP?: number;
  readonly repetitionPenalty?: number;
  readonly frequencyPenalty?: number;
  readonly presencePenalty?: number;
  readonly doSample?: boolean;
  /** Same seed → same output. When absent the engine picks one and reports it. */
  readonly seed?: number;
}

export interface GenerateRequest {
  /** Prompt text (tokenized by the engine, with BOS as the tokenizer config says) or token ids. */
  readonly prompt: string | readonly number[];
  /**
   * For a text prompt: whether tokenizing adds the tokenizer's special tokens (BOS; default true). False for
   * text a chat template rendered, which carries them already.
   */
  readonly addSpecialTokens?: boolean;
  /** null/'' → base model. */
  readonly adapterId?: string | null;
  /** Where to load the adapter from: 'bank' (default when the bank has the id) or 'local' (a PEFT directory path). */
  readonly adapterSource?: 'bank' | 'local';
  /** For adapterSource 'local': the PEFT directory (the server validates confinement before this). */
  readonly adapterPath?: string;
  readonly maxNewTokens: number;
  readonly sampling?: SamplingParams;
  readonly stop?: readonly string[];
  readonly ignoreEos?: boolean;
  /** Keep only the last N prompt tokens. */
  readonly truncate?: number;
  /** Report this many top alternatives per generated token (0 = none). */
  readonly topAlternatives?: number;
  /** Also return the prompt tokens' logprobs. */
  readonly prefillDetails?: boolean;
  /**
   * With prefillDetails: also return, after each prompt position, the whole next-token
   * log-probability vector (vocab floats per position; for verification, not for serving).
   */
  readonly prefillDistributions?: boolean;
  /** Cancels the request; its rows and KV blocks are freed at the next step. */
  readonly signal?: AbortSignal;
}

export interface TokenInfo {
  readonly id: number;
  readonly text: string;
  readonly logprob: number;
  readonly special: boolean;
}

export type FinishReason = 'length' | 'eos_token' | 'stop_sequence';

export type GenerateEvent =
  | {
      readonly type: 'token';
      readonly token: TokenInfo;
      readonly alternatives?: readonly TokenInfo[];
      /** This token completes a stop sequence: the generated text ends at this index (the stop excluded). */
      readonly stopCut?: number;
    }
  | {
      readonly type: 'done';
      readonly finishReason: FinishReason;
      /** Generated text, stop sequence excluded. */
      readonly generatedText: string;
      readonly promptTokens: number;
      readonly generatedTokens: number;
      readonly seed: number | null;
      /** Milliseconds from submission to the first step that computed the request (its wait in the queue). */
      readonly queueMs?: number;
      /** With finishReason stop_sequence: the index of the generated token the stop starts in (it and later ones belong to the stop). */
      readonly stopToken?: number;
      /**
       * With finishReason stop_sequence: the generated text from the stop on (the stop, and any text of the tokens
       * that completed it after it). generatedText + stopText is every generated token's text, which LoRAX returns.
       */
      readonly stopText?: string;
      readonly prefill?: readonly TokenInfo[];
      /** With prefillDetails and topAlternatives: each prompt token's top alternatives (none for the first). */
      readonly prefillAlternatives?: readonly (readonly TokenInfo[])[];
      /** With prefillDistributions: log p(· | prompt[0..p]) for every prompt position p. */
      readonly prefillDistributions?: readonly Float32Array[];
    };

export interface AdapterStatus {
  readonly id: string;
  readonly source: 'bank' | 'local';
  readonly storage: 'compressed' | 'raw';
  readonly tier: 'resident' | 'disk' | 'loading' | 'failed';
  readonly pinned: boolean;
  readonly bytes: number;
  readonly error?: string;
}

export interface EngineStats {
  readonly running: number;
  readonly waiting: number;
  /** Requests in the last step's batch; 0 once the engine is idle. */
  readonly batchSize: number;
  readonly kvBlocksUsed: number;
  readonly kvBlocksTotal: number;
  readonly adapterHits: number;
  readonly adapterMisses: number;
  readonly adapterLoads: number;
  readonly adapterEvictions: number;
  readonly adapterBytesResident: number;
  readonly generatedTokens: number;
}

/** One forward step, as the engine reports it to `onStep` listeners (LoRAX's batch metrics). */
export interface EngineStep {
  /** 'prefill' when the step holds prompt rows (continuous batching mixes them with decode rows), else 'decode'. */
  readonly method: 'prefill' | 'decode';
  /** False when the forward pass failed (its requests failed). */
  readonly ok: boolean;
  readonly seconds: number;
  /** Requests in the step. */
  readonly requests: number;
  /** Requests whose prompt starts in this step (joining the running batch). */
  readonly joined: number;
  /** Prompt + max_new_tokens summed over the step's requests: the tokens the batch may reach. */
  readonly maxTokens: number;
}

export interface EngineInfo {
  readonly modelId: string;
  readonly modelDtype: string;
  /** dtype of resident PEFT-directory adapters' factors (the engine's loraDtype, resolved: adapterDtypes). */
  readonly loraDtype: WeightDtype;
  /** dtype of resident bank adapters' shared bases, cores and raw factors (adapterDtypes). */
  readonly bankDtype: WeightDtype;
  readonly maxInputTokens: number;
  readonly maxTotalTokens: number;
  readonly maxBatchTokens: number;
  /** Tokens the KV cache holds in all (prompt + generated of every running request together). */
  readonly kvCapacityTokens: number;
  readonly eosTokenIds: readonly number[];
  readonly kernel: string;
  /** The most characters one token's text holds, when the tokenizer tells (a longer text has more tokens). */
  readonly maxTokenChars?: number;
}

export interface Engine {
  readonly info: EngineInfo;
  /**
   * Starts a request; yields one event per generated token, then one 'done'. Errors before the first
   * token are thrown from the first `next()` as SoppuError (VALIDATION, ADAPTER_NOT_FOUND,
   * ADAPTER_LOAD …), so callers can answer with a real HTTP status.
   */
  generate(request: GenerateRequest): AsyncIterable<GenerateEvent>;
  /** `addSpecialTokens` (default true): BOS and the like, as the tokenizer config says. */
  tokenize(text: string, addSpecialTokens?: boolean): { ids: number[]; tokens: { id: number; text: string; start: number; stop: number }[] };
  detokenize(ids: readonly number[]): string;
  /**
   * One token's own bytes (a part of a UTF-8 character included), for logprobs: asked for only when a
   * response shows them, so generation does not pay for it.
   */
  tokenBytes?(id: number): readonly number[];
  /** Chat messages → prompt text through the model's chat template. */
  applyChatTemplate(messages: readonly { role: string; content: string }[], addGenerationPrompt?: boolean): string;
  /** Adapters known to the engine (bank ids and registered local ones). */
  listAdapters(): AdapterStatus[];
  hasAdapter(id: string): boolean;
  /**
   * Registers a PEFT directory under `id`: projected into the bank (`compress: true`, replacing the bank's
   * adapter of that id) or served raw. Replaces an existing id (hot reload). `onRelease`: called once the
   * engine will not read `dir` again (after a compress registration; else once the registration is replaced
   * or removed and no request holds it).
   */
  registerAdapter(id: string, dir: string, options?: { compress?: boolean; ignoreBaseModel?: boolean; onRelease?: () => void }): Promise<AdapterStatus>;
  /** Removes a registration, or else the bank's adapter of that id from the bank. */
  removeAdapter(id: string): Promise<void>;
  /** Reads the bank again from disk (changed by the CLI while serving); CONFIG without a bank. */
  reloadBank?(): Promise<{ adapters: number }>;
  pinAdapter(id: string, pinned: boolean): Promise<void>;
  stats(): EngineStats;
  /** Calls `listener` after every forward step; returns the unsubscribe. */
  onStep?(listener: (step: EngineStep) => void): () => void;
  /** Stops accepting requests; resolves when running ones finish or the deadline passes (then they are cancelled). */
  drain(deadlineMs: number): Promise<void>;
  close(): Promise<void>;
}
