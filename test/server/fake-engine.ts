/**
 * A small deterministic Engine for server contract tests. One character is one token (id = char
 * code); an adapter's output is a fixed function of its id and the prompt; ids in `failing`
 * fail before the first token with ADAPTER_LOAD naming a file. `tokenDelayMs` paces tokens so
 * tests can observe concurrency, cancellation and draining.
 */
import type { AdapterStatus, Engine, EngineStats, GenerateEvent, GenerateRequest } from '../../src/engine/engine-types.js';
import { SoppuError } from '../../src/errors/soppu-error.js';

const ALPHABET = 'abcdefghij klmnop.';
const EOS = 0;

export interface FakeEngineOptions {
  adapters?: string[];
  failing?: string[];
  tokenDelayMs?: number;
  /** Milliseconds registerAdapter takes (a large upload's load). */
  registerDelayMs?: number;
  /** Produce EOS after this many tokens unless ignoreEos. */
  eosAfter?: number;
}

export class FakeEngine implements Engine {
  readonly info = { modelId: 'fake/tiny', modelDtype: 'f32', loraDtype: 'f32' as const, bankDtype: 'bf16' as const, maxInputTokens: 64, maxTotalTokens: 96, maxBatchTokens: 512, kvCapacityTokens: 4096, eosTokenIds: [EOS], kernel: 'fake' };
  readonly adapters = new Map<string, AdapterStatus & { version: number }>();
  readonly failing: Set<string>;
  /** Set by a test that reloads a bank (absent: the engine cannot, as an engine without a bank). */
  reloadBank?: () => Promise<{ adapters: number }>;
  tokenDelayMs: number;
  registerDelayMs: number;
  eosAfter: number;
  running = 0;
  kvBlocksUsed = 0;
  generated = 0;
  cancelled = 0;
  lastRequest: GenerateRequest | null = null;
  private draining = false;

  constructor(options: FakeEngineOptions = {}) {
    for (const id of options.adapters ?? []) this.adapters.set(id, { id, source: 'bank', storage: 'compressed', tier: 'disk', pinned: false, bytes: 1000, version: 0 });
    this.failing = new Set(options.failing ?? []);
    for (const id of this.failing) this.adapters.set(id, { id, source: 'bank', storage: 'raw', tier: 'disk', pinned: false, bytes: 10, version: 0 });
    this.tokenDelayMs = options.tokenDelayMs ?? 0;
    this.registerDelayMs = options.registerDelayMs ?? 0;
    this.eosAfter = options.eosAfter ?? 1000;
  }

  /** The tokens a request produces, for comparing against the server. */
  expectedText(prompt: string, adapterId: string | null, count: number): string {
    const version = adapterId ? (this.adapters.get(adapterId)?.version ?? 0) : 0;
    let seed = version * 7;
    for (const ch of `${adapterId ?? ''}|${prompt}`) seed = (seed * 31 + ch.charCodeAt(0)) >>> 0;
    let out = '';
    for (let i = 0; i < count; i++) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      out += ALPHABET[(seed >>> 8) % ALPHABET.length];
    }
    return out;
  }

  generate(request: GenerateRequest): AsyncIterable<GenerateEvent> {
    const self = this;
    return {
      async *[Symbol.asyncIterator]() {
        self.lastRequest = request;
        if (self.draining) throw new SoppuError('SHUTTING_DOWN', 'draining');
        const id = request.adapterId ?? null;
        if (id && self.failing.has(id)) {
          throw new SoppuError('ADAPTER_TENSORS', `adapter '${id}': adapter_model.safetensors: tensor lora_A has shape [3, 7], expected [4, 16]`, { file: 'adapter_model.safetensors' });
        }
        if (id && request.adapterSource !== 'local' && !self.adapters.has(id)) throw new SoppuError('ADAPTER_NOT_FOUND', `engine: no adapter '${id}'`);
        // as the adapter cache words a local folder it cannot read: its absolute path, twice
        if (request.adapterSource === 'local' && request.adapterPath?.includes('broken')) {
          const file = `${request.adapterPath}/adapter_model.safetensors`;
          throw new SoppuError('ADAPTER_LOAD', `adapter ${id} could not be loaded from ${request.adapterPath}: ${file}: header too long`, { file });
        }
        const prompt = typeof request.prompt === 'string' ? request.prompt : String.fromCharCode(...request.prompt);
        const promptTokens = request.truncate ? Math.min(request.truncate, prompt.length) : prompt.length;
        const text = self.expectedText(prompt, id, request.maxNewTokens);
        self.running += 1;
        self.kvBlocksUsed += 2;
        let generated = '';
        let stopText: string | undefined;
        let finishReason: 'length' | 'eos_token' | 'stop_sequence' = 'length';
        let count = 0;
        try {
          for (let i = 0; i < request.maxNewTokens; i++) {
            if (self.tokenDelayMs > 0) await new Promise((r) => setTimeout(r, self.tokenDelayMs));
            if (request.signal?.aborted) {
              self.cancelled += 1;
              throw new SoppuError('CANCELLED', 'request cancelled');
            }
            count += 1;
            self.generated += 1;
            if (i === self.eosAfter && !request.ignoreEos) {
              yield { type: 'token', token: { id: EOS, text: '', logprob: -0.1, special: true } };
              finishReason = 'eos_token';
              break;
            }
            const ch = text[i] as string;
            generated += ch;
            const alternatives = request.topAlternatives ? [{ id: 1, text: 'z', logprob: -3, special: false }].slice(0, request.topAlternatives) : undefined;
            // as the engine: the token that completes a stop carries where the text is cut
            const stop = (request.stop ?? []).find((s) => generated.endsWith(s));
            const stopCut = stop !== undefined ? generated.length - stop.length : undefined;
            yield { type: 'token', token: { id: ch.charCodeAt(0), text: ch, logprob: -0.5, special: false }, alternatives, ...(stopCut !== undefined ? { stopCut } : {}) };
            if (stopCut !== undefined) {
              stopText = generated.slice(stopCut);
              generated = generated.slice(0, stopCut);
              finishReason = 'stop_sequence';
              break;
            }
          }
          yield {
            type: 'done',
            finishReason,
            generatedText: generated,
            ...(stopText !== undefined ? { stopText } : {}),
            promptTokens,
            generatedTokens: count,
            seed: request.sampling?.seed ?? null,
            prefill: request.prefillDetails ? [...prompt].map((c) => ({ id: c.charCodeAt(0), text: c, logprob: -1, special: false })) : undefined,
          };
        } finally {
          self.running -= 1;
          self.kvBlocksUsed -= 2;
        }
      },
    };
  }

  tokenize(text: string) {
    const tokens = [...text].map((c, i) => ({ id: c.charCodeAt(0), text: c, start: i, stop: i + 1 }));
    return { ids: tokens.map((t) => t.id), tokens };
  }

  detokenize(ids: readonly number[]): string {
    return String.fromCharCode(...ids);
  }

  /** The messages of the last chat template call. */
  lastChat: { role: string; content: string }[] | null = null;

  applyChatTemplate(messages: readonly { role: string; content: string }[]): string {
    this.lastChat = messages.map((m) => ({ ...m }));
    return `${messages.map((m) => `<${m.role}>${m.content}`).join('')}<assistant>`;
  }

  listAdapters(): AdapterStatus[] {
    return [...this.adapters.values()].map(({ version: _version, ...status }) => status);
  }

  hasAdapter(id: string): boolean {
    return this.adapters.has(id);
  }

  /** The options of the last registerAdapter call. */
  lastRegisterOptions: { compress?: boolean; ignoreBaseModel?: boolean } | undefined;

  async registerAdapter(id: string, dir: string, options?: { compress?: boolean; ignoreBaseModel?: boolean }): Promise<AdapterStatus> {
    this.lastRegisterOptions = options;
    const { existsSync } = await import('node:fs');
    if (!existsSync(`${dir}/adapter_config.json`)) throw new SoppuError('ADAPTER_CONFIG', `${dir}/adapter_config.json is missing`, { file: `${dir}/adapter_config.json` });
    if (this.registerDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, this.registerDelayMs));
    const previous = this.adapters.get(id);
    const status = { id, source: 'local' as const, storage: options?.compress === false ? ('raw' as const) : ('compressed' as const), tier: 'disk' as const, pinned: previous?.pinned ?? false, bytes: 500, version: (previous?.version ?? 0) + 1 };
    this.adapters.set(id, status);
    this.failing.delete(id);
    const { version: _version, ...rest } = status;
    return rest;
  }

  async removeAdapter(id: string): Promise<void> {
    this.adapters.delete(id);
  }

  async pinAdapter(id: string, pinned: boolean): Promise<void> {
    const status = this.adapters.get(id);
    if (status) this.adapters.set(id, { ...status, pinned, tier: pinned ? 'resident' : status.tier });
  }

  stats(): EngineStats {
    return {
      running: this.running,
      waiting: 0,
      batchSize: this.running,
      kvBlocksUsed: this.kvBlocksUsed,
      kvBlocksTotal: 1000,
      adapterHits: 0,
      adapterMisses: 0,
      adapterLoads: 0,
      adapterEvictions: 0,
      adapterBytesResident: 0,
      generatedTokens: this.generated,
    };
  }

  async drain(deadlineMs: number): Promise<void> {
    this.draining = true;
    const end = Date.now() + deadlineMs;
    while (this.running > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
  }

  async close(): Promise<void> {}
}
