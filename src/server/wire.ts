/**
 * The one module that translates between the wire (LoRAX / OpenAI snake_case JSON) and the engine's
 * camelCase types. Body shapes and ranges are enforced earlier by the JSON schemas
 * (request-schemas.ts); the rules that a schema cannot express are checked here.
 */
import type { FinishReason, GenerateEvent, SamplingParams, TokenInfo } from '../engine/engine-types.js';
import { SoppuError } from '../errors/soppu-error.js';
import { MAX_CHOICES } from './request-schemas.js';

/** A generation as the server sees it, whichever dialect it came in. */
export interface GenerationCall {
  /** The prompt text (for token ids: their decoding, filled in by the route that has the tokenizer). */
  readonly prompt: string;
  /** A prompt given as token ids (OpenAI completions): generated from as they are, not re-tokenized. */
  readonly promptIds?: readonly number[];
  /** Whether tokenizing the prompt adds BOS (false for a chat template's output, which has it). */
  readonly addSpecialTokens: boolean;
  /** '' → base model. */
  readonly adapterId: string;
  readonly adapterSource: 'bank' | 'local' | undefined;
  /** undefined → the remaining token budget (LoRAX's default). */
  readonly maxNewTokens: number | undefined;
  readonly sampling: SamplingParams;
  readonly stop: readonly string[];
  readonly ignoreEos: boolean;
  readonly truncate: number | undefined;
  readonly topAlternatives: number;
  readonly prefillDetails: boolean;
  readonly returnFullText: boolean;
  readonly details: boolean;
}

export type DoneEvent = Extract<GenerateEvent, { type: 'done' }>;

const REFUSED_SOURCES = new Set(['hub', 's3', 'pbase']);

function validation(message: string, field: string): SoppuError {
  return new SoppuError('VALIDATION', `Input validation error: ${message}`, { field });
}

/** adapter_source, case-insensitive: bank and local are served; LoRAX's remote sources are refused by name. */
export function parseAdapterSource(value: unknown, field: string): 'bank' | 'local' | undefined {
  if (value === undefined || value === null) return undefined;
  const source = String(value).toLowerCase();
  if (source === 'bank' || source === 'local') return source;
  if (REFUSED_SOURCES.has(source)) {
    throw validation(`\`${field}\` '${source}' is not supported by this server (no network access); use 'bank' or 'local'`, field);
  }
  throw validation(`\`${field}\` must be one of 'bank', 'local'; got '${String(value)}'`, field);
}

/** LoRAX `parameters` object (after schema validation). */
export interface LoraxParameters {
  adapter_id?: string | null;
  adapter_source?: string | null;
  merged_adapters?: unknown;
  api_token?: string | null;
  best_of?: number | null;
  max_new_tokens?: number | null;
  temperature?: number | null;
  top_k?: number | null;
  top_p?: number | null;
  typical_p?: number | null;
  repetition_penalty?: number | null;
  frequency_penalty?: number | null;
  presence_penalty?: number | null;
  do_sample?: boolean;
  seed?: number | null;
  stop?: string[];
  return_full_text?: boolean | null;
  truncate?: number | null;
  ignore_eos_token?: boolean;
  watermark?: boolean;
  apply_chat_template?: boolean;
  details?: boolean;
  decoder_input_details?: boolean;
  return_k_alternatives?: number | null;
  response_format?: { type?: string } | null;
}

export interface LoraxGenerateBody {
  inputs: string;
  parameters?: LoraxParameters;
  stream?: boolean;
}

/** LoRAX GenerateRequest → GenerationCall. */
/**
 * `fullTextByDefault`: return_full_text when the request leaves it unset — false on /generate; on the compat
 * routes LoRAX takes it from the pipeline tag, true for text-generation (what /info reports).
 */
export function fromLoraxBody(body: LoraxGenerateBody, stream: boolean, fullTextByDefault = false): GenerationCall {
  const p = body.parameters ?? {};
  if (p.merged_adapters !== undefined && p.merged_adapters !== null) {
    throw validation('`parameters.merged_adapters` is not supported by this server', 'parameters.merged_adapters');
  }
  if (p.best_of !== undefined && p.best_of !== null && p.best_of > 1) {
    throw validation(`\`parameters.best_of\` must be 1 (max_best_of is 1); got ${p.best_of}`, 'parameters.best_of');
  }
  if (p.watermark === true) throw validation('`parameters.watermark` is not supported by this server', 'parameters.watermark');
  // refused rather than ignored (the prompt would go in without the template the request asked for)
  if (p.apply_chat_template === true) {
    throw validation('`parameters.apply_chat_template` is not supported by this server: send the messages to /v1/chat/completions, which applies the model\'s chat template', 'parameters.apply_chat_template');
  }
  if (p.response_format !== undefined && p.response_format !== null && p.response_format.type !== 'text') {
    throw validation('`parameters.response_format` (constrained JSON decoding) is not supported by this server', 'parameters.response_format');
  }
  if (stream && p.decoder_input_details === true) {
    throw validation('`parameters.decoder_input_details` == true is not supported when streaming tokens', 'parameters.decoder_input_details');
  }
  return {
    prompt: body.inputs,
    addSpecialTokens: true,
    adapterId: p.adapter_id ?? '',
    adapterSource: parseAdapterSource(p.adapter_source, 'parameters.adapter_source'),
    maxNewTokens: p.max_new_tokens ?? undefined,
    sampling: {
      temperature: p.temperature ?? undefined,
      topK: p.top_k ?? undefined,
      topP: p.top_p ?? undefined,
      typicalP: p.typical_p ?? undefined,
      repetitionPenalty: p.repetition_penalty ?? undefined,
      frequencyPenalty: p.frequency_penalty ?? undefined,
      presencePenalty: p.presence_penalty ?? undefined,
      doSample: p.do_sample ?? false,
      seed: p.seed ?? undefined,
    },
    stop: p.stop ?? [],
    ignoreEos: p.ignore_eos_token ?? false,
    truncate: p.truncate ?? undefined,
    topAlternatives: p.return_k_alternatives ?? 0,
    prefillDetails: p.decoder_input_details ?? false,
    returnFullText: p.return_full_text ?? fullTextByDefault,
    details: (p.details ?? false) || (p.decoder_input_details ?? false),
  };
}

/** Token as LoRAX puts it on the wire. */
export function toWireToken(token: TokenInfo, alternatives?: readonly TokenInfo[]): Record<string, unknown> {
  const wire: Record<string, unknown> = { id: token.id, text: token.text, logprob: token.logprob, special: token.special, skipped: false };
  if (alternatives && alternatives.length > 0) {
    wire.alternative_tokens = alternatives.map((a) => ({ id: a.id, text: a.text, logprob: a.logprob }));
  }
  return wire;
}

export interface CollectedToken {
  readonly token: TokenInfo;
  readonly alternatives?: readonly TokenInfo[];
}

/**
 * The final event as LoRAX reports it: a request that made its max_new_tokens finishes with `length` even when
 * its last token was eos or completed a stop (TGI's stopping criteria count the token first); the OpenAI
 * routes keep the engine's reason there, as vLLM does.
 */
export function asLoraxDone(done: DoneEvent, maxNewTokens: number): DoneEvent {
  return done.finishReason !== 'length' && done.generatedTokens >= maxNewTokens ? { ...done, finishReason: 'length' } : done;
}

/** LoRAX GenerateResponse. */
export function toLoraxResponse(call: GenerationCall, done: DoneEvent, tokens: readonly CollectedToken[]): Record<string, unknown> {
  const response: Record<string, unknown> = { generated_text: loraxGeneratedText(call, done) };
  if (call.details) {
    response.details = {
      finish_reason: done.finishReason,
      prompt_tokens: done.promptTokens,
      generated_tokens: done.generatedTokens,
      skipped_tokens: 0,
      seed: done.seed,
      prefill: (done.prefill ?? []).map((t) => ({ id: t.id, text: t.text, logprob: t.logprob })),
      tokens: tokens.map((t) => toWireToken(t.token, t.alternatives)),
    };
  }
  return response;
}

/** The answer's text on the OpenAI routes: the stop sequence excluded, after the prompt when echoed. */
export function fullText(call: GenerationCall, done: DoneEvent): string {
  return call.returnFullText ? call.prompt + done.generatedText : done.generatedText;
}

/**
 * LoRAX's generated_text: every generated token's text, a matched stop sequence included (a stop only ends the
 * generation there, as in TGI), after the prompt with return_full_text.
 */
function loraxGeneratedText(call: GenerationCall, done: DoneEvent): string {
  const generated = done.generatedText + (done.stopText ?? '');
  return call.returnFullText ? call.prompt + generated : generated;
}

/** One LoRAX stream event for a token; the last one carries the text and (optionally) details. */
export function toLoraxStreamEvent(call: GenerationCall, token: CollectedToken, done: DoneEvent | null): Record<string, unknown> {
  return {
    token: toWireToken(token.token, token.alternatives),
    generated_text: done ? loraxGeneratedText(call, done) : null,
    details:
      done && call.details
        ? { finish_reason: done.finishReason, prompt_tokens: done.promptTokens, generated_tokens: done.generatedTokens, seed: done.seed }
        : null,
  };
}

// ---------------------------------------------------------------- OpenAI

/** OpenAI finish_reason: eos and stop sequences are both "stop" (LoRAX's "content_filter" quirk fixed). */
export function toOpenAiFinishReason(reason: FinishReason): 'stop' | 'length' {
  return reason === 'length' ? 'length' : 'stop';
}

export interface OpenAiCommonBody {
  model?: string;
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  n?: number | null;
  stop?: string | string[] | null;
  stream?: boolean | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  repetition_penalty?: number | null;
  top_k?: number | null;
  ignore_eos_token?: boolean | null;
  logit_bias?: Record<string, number> | null;
  adapter_source?: string | null;
  api_token?: string | null;
  response_format?: { type?: string } | null;
  stream_options?: { include_usage?: boolean } | null;
}

export interface OpenAiCompletionBody extends OpenAiCommonBody {
  prompt: string | string[] | number[] | number[][];
  echo?: boolean | null;
  suffix?: string | null;
  logprobs?: number | null;
  best_of?: number | null;
}

export interface OpenAiChatBody extends OpenAiCommonBody {
  messages: { role: string; content?: string | { type: string; text?: string }[] | null; tool_calls?: unknown[] | null }[];
  tools?: unknown[] | null;
  tool_choice?: unknown;
  logprobs?: boolean | null;
  top_logprobs?: number | null;
}

/** model '' or the base model id → base; anything else is an adapter id. */
export function adapterFromModel(model: string | undefined, baseModelId: string): string {
  return model === undefined || model === '' || model === baseModelId ? '' : model;
}

/**
 * The OpenAI logprobs a request asks for: null (none), else how many alternatives per token (completions'
 * `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k`).
 */
export function openAiLogprobs(body: OpenAiCompletionBody | OpenAiChatBody, dialect: 'completion' | 'chat'): number | null {
  if (dialect === 'completion') return (body as OpenAiCompletionBody).logprobs ?? null;
  const chat = body as OpenAiChatBody;
  if (chat.logprobs === true) return chat.top_logprobs ?? 0;
  if (chat.top_logprobs !== undefined && chat.top_logprobs !== null) throw validation('`top_logprobs` needs `logprobs` set to true', 'top_logprobs');
  return null;
}

function fromOpenAiCommon(body: OpenAiCommonBody, prompt: string, baseModelId: string, returnFullText: boolean, addSpecialTokens: boolean, logprobs: number | null): GenerationCall {
  if (body.response_format && body.response_format.type !== 'text') {
    throw validation('`response_format` (constrained JSON decoding) is not supported by this server', 'response_format');
  }
  // refused rather than ignored: the output would not be what the request asked for
  if (body.logit_bias && Object.keys(body.logit_bias).length > 0) throw validation('`logit_bias` is not supported by this server', 'logit_bias');
  // as OpenAI and vLLM answer it: the options would be silently unused
  if (body.stream_options !== undefined && body.stream_options !== null && body.stream !== true) {
    throw validation('`stream_options` is only allowed when `stream` is true', 'stream_options');
  }
  const temperature = body.temperature ?? 1;
  const stop = body.stop === undefined || body.stop === null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return {
    prompt,
    addSpecialTokens,
    adapterId: adapterFromModel(body.model, baseModelId),
    adapterSource: parseAdapterSource(body.adapter_source, 'adapter_source'),
    maxNewTokens: body.max_completion_tokens ?? body.max_tokens ?? undefined,
    // OpenAI semantics: temperature 0 is greedy, anything else (the default 1 included) samples. The 0 goes to the
    // engine as it is, which then decodes greedily whatever else is set (dropped, a top_p or top_k sampled at 1)
    sampling: {
      temperature,
      doSample: temperature !== 0,
      topP: body.top_p ?? undefined,
      topK: body.top_k ?? undefined,
      repetitionPenalty: body.repetition_penalty ?? undefined,
      frequencyPenalty: body.frequency_penalty ?? undefined,
      presencePenalty: body.presence_penalty ?? undefined,
      seed: body.seed ?? undefined,
    },
    stop,
    ignoreEos: body.ignore_eos_token ?? false,
    truncate: undefined,
    topAlternatives: logprobs ?? 0,
    prefillDetails: false,
    returnFullText,
    details: false,
  };
}

/** OpenAI's prompts: a string, token ids, or a list of either (each prompt its own choices). */
function promptsOf(prompt: OpenAiCompletionBody['prompt']): (string | number[])[] {
  if (typeof prompt === 'string') return [prompt];
  if (prompt.length > 0 && prompt.every((id) => typeof id === 'number')) return [prompt as number[]];
  return (prompt as (string | number[])[]).map((one) => one);
}

/**
 * Several choices of one request (`n` per prompt, in OpenAI's order: prompt by prompt): the same call, a
 * seed given becoming seed + j for the j-th, so the choices differ as OpenAI's do. Not on streams.
 */
function choicesOf(calls: readonly GenerationCall[], n: number | null | undefined, stream: boolean | null | undefined): GenerationCall[] {
  const count = n ?? 1;
  if (calls.length * count > MAX_CHOICES) throw validation(`\`n\` × prompts must be at most ${MAX_CHOICES}; got ${calls.length * count}`, 'n');
  if (calls.length * count > 1 && stream === true) throw validation('`n` > 1 and several prompts are not supported when streaming', 'n');
  return calls.flatMap((call) =>
    Array.from({ length: count }, (_, j) => (j === 0 || call.sampling.seed === undefined ? call : { ...call, sampling: { ...call.sampling, seed: call.sampling.seed + j } })),
  );
}

/** The generations of a /v1/completions request: one per prompt and choice, in choice order. */
export function openAiCompletionCalls(body: OpenAiCompletionBody, baseModelId: string): GenerationCall[] {
  const prompts = promptsOf(body.prompt);
  if (prompts.length > MAX_CHOICES) throw validation(`\`prompt\` holds ${prompts.length} prompts; at most ${MAX_CHOICES}`, 'prompt');
  return choicesOf(prompts.map((prompt) => fromOpenAiCompletion(body, prompt, baseModelId)), body.n, body.stream);
}

/** The generations of a /v1/chat/completions request: `n` of the templated prompt. */
export function openAiChatCalls(body: OpenAiChatBody, prompt: string, baseModelId: string): GenerationCall[] {
  return choicesOf([fromOpenAiChat(body, prompt, baseModelId)], body.n, body.stream);
}

/** One prompt's generation of a /v1/completions request (a string, or token ids). */
export function fromOpenAiCompletion(body: OpenAiCompletionBody, single: string | number[], baseModelId: string): GenerationCall {
  const prompt = typeof single === 'string' ? single : '';
  if (body.best_of !== undefined && body.best_of !== null && body.best_of !== 1) throw validation(`\`best_of\` must be 1; got ${body.best_of}`, 'best_of');
  if (body.suffix) throw validation('`suffix` (insertion) is not supported by this server', 'suffix');
  const logprobs = openAiLogprobs(body, 'completion');
  const echoLogprobs = (body.echo ?? false) && logprobs !== null;
  // the echoed prompt's logprobs come with the final event: a stream has sent the prompt by then
  if (echoLogprobs && body.stream === true) throw validation('`echo` with `logprobs` (the prompt tokens\' logprobs) is not supported when streaming', 'echo');
  const common = fromOpenAiCommon(body, prompt, baseModelId, body.echo ?? false, true, logprobs);
  const withIds = typeof single === 'string' ? common : { ...common, promptIds: single, addSpecialTokens: false }; // ids are the whole prompt, BOS included
  const call = echoLogprobs ? { ...withIds, prefillDetails: true } : withIds;
  // OpenAI's completions default is 16 tokens (chat's is what the context leaves)
  return call.maxNewTokens === undefined ? { ...call, maxNewTokens: OPENAI_COMPLETION_DEFAULT_MAX_TOKENS } : call;
}

/** OpenAI's default max_tokens for /v1/completions. */
export const OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16;

/**
 * Chat messages → plain {role, content} for the chat template; image parts and tools are refused. A
 * `developer` message (OpenAI's newer name for system instructions) is given to the template as `system`.
 */
export function chatMessages(body: OpenAiChatBody): { role: string; content: string }[] {
  if (body.tools !== undefined && body.tools !== null && body.tools.length > 0) throw validation('`tools` are not supported by this server', 'tools');
  return body.messages.map((message, index) => {
    // tool calls would reach the template without their calls (it sees role and content): refused as tools are
    if (message.tool_calls && message.tool_calls.length > 0) throw validation(`\`messages[${index}].tool_calls\`: tool calls are not supported by this server`, `messages[${index}].tool_calls`);
    const role = message.role === 'developer' ? 'system' : message.role;
    // as OpenAI: only an assistant turn may go without content
    if (message.content === undefined && message.role !== 'assistant') throw validation(`Missing required parameter: \`messages[${index}].content\``, `messages[${index}].content`);
    if (message.content === undefined || message.content === null || typeof message.content === 'string') return { role, content: message.content ?? '' };
    const parts = message.content.map((part, partIndex) => {
      if (part.type !== 'text' || typeof part.text !== 'string') {
        throw validation(`\`messages[${index}].content[${partIndex}]\`: only text parts are supported; got type '${part.type}'`, `messages[${index}].content`);
      }
      return part.text;
    });
    return { role, content: parts.join('') };
  });
}

/** `prompt`: the chat template's rendering of the messages, which holds the special tokens (BOS) itself. */
export function fromOpenAiChat(body: OpenAiChatBody, prompt: string, baseModelId: string): GenerationCall {
  return fromOpenAiCommon(body, prompt, baseModelId, false, false, openAiLogprobs(body, 'chat'));
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export function toUsage(done: DoneEvent): Usage {
  return { prompt_tokens: done.promptTokens, completion_tokens: done.generatedTokens, total_tokens: done.promptTokens + done.generatedTokens };
}

/**
 * Streams text so that what was sent is always a prefix of the final text: with stop sequences, the
 * last (longest stop) characters are held back until the next token shows they are not the start
 * of a stop sequence (which the final text excludes), and nothing from a complete stop sequence on
 * is sent (the token that completes one may carry text past it; the engine cuts at the earliest).
 */
export class StopSafeText {
  private text = '';
  private sent = 0;
  /** Where the final text ends once a stop completed (nothing after it is sent). */
  private cut: number | null = null;
  private readonly holdBack: number;

  constructor(stop: readonly string[]) {
    // the token that completes a stop sequence is still reported before 'done', so hold back a full stop length
    this.holdBack = Math.max(0, ...stop.map((s) => s.length));
  }

  /**
   * Adds a token's decoded text ('' for a special token) and, when it completes a stop sequence, the engine's
   * cut (its event's stopCut: the engine matches stops with special tokens' text kept); returns what may be sent.
   */
  push(tokenText: string, stopCut?: number): string {
    if (this.cut !== null) return '';
    this.text += tokenText;
    let end = this.text.length - this.holdBack;
    if (stopCut !== undefined) end = this.cut = stopCut;
    const safe = Math.max(this.sent, end);
    const out = this.text.slice(this.sent, safe);
    this.sent = safe;
    return out;
  }

  /** Characters sent so far (no stop can begin before them). */
  get sentLength(): number {
    return this.sent;
  }

  /** The rest of the final text. */
  finish(finalText: string): string {
    return finalText.slice(Math.min(this.sent, finalText.length));
  }
}
