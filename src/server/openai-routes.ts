/**
 * OpenAI-compatible routes: /v1/completions, /v1/chat/completions (model = adapter id, or '' / the
 * base model id for the base), and /v1/models listing what this caller may use.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { AdapterStatus } from '../engine/engine-types.js';
import { failureLabel, openAiErrorBody, toSoppuError } from './error-response.js';
import { adapterNotFound, refuseUntokenizable } from './generation-service.js';
import { LogprobCollector, inAnswer, type LogprobEntry } from './logprob-collector.js';
import { recordDone, startCall, type Prepared } from './lorax-routes.js';
import type { buildSchemas } from './request-schemas.js';
import { abortOnDisconnect, callerOf, closeGeneration, eventsOf, headerValue, openEventStream, recordSuccess, type EventStream, type ServerContext } from './server-context.js';
import {
  chatMessages,
  openAiChatCalls,
  openAiCompletionCalls,
  fullText,
  openAiLogprobs,
  StopSafeText,
  toOpenAiFinishReason,
  toUsage,
  type DoneEvent,
  type GenerationCall,
  type OpenAiChatBody,
  type OpenAiCompletionBody,
} from './wire.js';

type Schemas = ReturnType<typeof buildSchemas>;
type Dialect = 'completion' | 'chat';

interface ChunkShape {
  readonly id: string;
  readonly created: number;
  readonly model: string;
  readonly fingerprint: string;
}

function choiceChunk(dialect: Dialect, text: string, finishReason: string | null, first: boolean, logprobs: unknown = null): Record<string, unknown> {
  if (dialect === 'completion') return { index: 0, text, logprobs, finish_reason: finishReason };
  const delta: Record<string, unknown> = first ? { role: 'assistant', content: text } : { content: text };
  return { index: 0, delta, logprobs, finish_reason: finishReason };
}

/** What a request asks for beyond the text: logprobs (null: none; else alternatives per token), usage in a stream. */
interface OpenAiExtras {
  readonly logprobs: number | null;
  readonly includeUsage: boolean;
  /** The engine's token bytes, for logprobs. */
  readonly tokenBytes?: (id: number) => readonly number[];
}

/** Where a request's answer starts in its text: after the prompt when it is echoed. */
function answerStartOf(call: GenerationCall): number {
  return call.returnFullText ? call.prompt.length : 0;
}

/** The logprob collector a request asks for (null: none), its answer starting after an echoed prompt. */
function collectorFor(call: GenerationCall, dialect: Dialect, extras: OpenAiExtras): LogprobCollector | null {
  return extras.logprobs === null ? null : new LogprobCollector(dialect, answerStartOf(call), extras.tokenBytes);
}

/** The choice one finished generation makes (without its index), and its final event. */
async function collectChoice(prepared: Prepared, dialect: Dialect, extras: OpenAiExtras): Promise<{ choice: Record<string, unknown>; done: DoneEvent }> {
  const call = prepared.call;
  // echoed prompt text comes before the answer's tokens
  const answerStart = answerStartOf(call);
  const logprobs = collectorFor(call, dialect, extras);
  let done: DoneEvent | null = null;
  for await (const event of eventsOf(prepared.started)) {
    if (event.type === 'done') done = event;
    else logprobs?.add(event.token, event.alternatives);
  }
  if (!done) throw toSoppuError(new Error('generation ended without a final event'));
  const text = fullText(call, done);
  logprobs?.finish(done.generatedText, answerStart);
  if (logprobs && done.prefill) logprobs.addPrompt(done.prefill, done.prefillAlternatives, call.prompt); // echo: the prompt's tokens lead
  const tokenLogprobs = logprobs ? logprobs.render(logprobs.all(answerStart + done.generatedText.length, done.stopToken)) : null;
  const finishReason = toOpenAiFinishReason(done.finishReason);
  const choice =
    dialect === 'chat'
      ? { message: { role: 'assistant', content: text }, logprobs: tokenLogprobs, finish_reason: finishReason }
      : { text, logprobs: tokenLogprobs, finish_reason: finishReason };
  return { choice, done };
}

function responseShape(context: ServerContext, dialect: Dialect, model: string): ChunkShape {
  return {
    id: `${dialect === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`,
    created: Math.floor(Date.now() / 1000),
    model,
    fingerprint: `${context.options.version}-native`,
  };
}

/**
 * A non-streamed answer of one or several choices (n > 1, or several prompts): every generation is admitted
 * and started, they run in the same batches, and the answer comes once all are done. `promptOf[i]`: which
 * prompt choice i answers (its prompt tokens count once in usage).
 */
async function runOpenAiChoices(context: ServerContext, request: FastifyRequest, reply: FastifyReply, calls: readonly GenerationCall[], promptOf: readonly number[], dialect: Dialect, model: string, extras: OpenAiExtras): Promise<unknown> {
  const controller = abortOnDisconnect(reply); // one client: all its choices go with it
  // all submitted at once, so their prefills share steps; one refused (429, a bad adapter): the started ones stop
  const settled = await Promise.allSettled(calls.map((call) => startCall(context, request, reply, call, controller)));
  const prepared = settled.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
  const refused = settled.find((result): result is PromiseRejectedResult => result.status === 'rejected');
  if (refused) {
    await Promise.all(prepared.map((p) => closeGeneration(p.started)));
    throw refused.reason;
  }
  const results = await Promise.all(prepared.map((p) => collectChoice(p, dialect, extras).finally(() => closeGeneration(p.started)))).catch((e: unknown) => {
    controller.abort(toSoppuError(e)); // one choice failed: the request fails, the others stop
    throw e;
  });
  const counted = new Set<number>();
  let promptTokens = 0;
  let completionTokens = 0;
  results.forEach(({ done }, i) => {
    if (!counted.has(promptOf[i]!)) promptTokens += done.promptTokens;
    counted.add(promptOf[i]!);
    completionTokens += done.generatedTokens;
  });
  // one request in the metrics, with every choice's tokens
  const first = prepared[0]!;
  recordSuccess(context, {
    startedAt: first.startedAt,
    validatedAt: first.validatedAt,
    firstEventMs: Math.min(...prepared.map((p) => p.started.timeToFirstEventMs)),
    ...(results.every(({ done }) => done.queueMs !== undefined) ? { queueMs: Math.min(...results.map(({ done }) => done.queueMs!)) } : {}),
    promptTokens,
    generatedTokens: completionTokens,
    maxNewTokens: first.started.request.maxNewTokens,
    inputs: prepared.length,
  });
  const shape = responseShape(context, dialect, model);
  return {
    id: shape.id,
    object: dialect === 'chat' ? 'chat.completion' : 'text_completion',
    created: shape.created,
    model,
    system_fingerprint: shape.fingerprint,
    choices: results.map(({ choice }, index) => ({ index, ...choice })),
    usage: { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens },
  };
}

/** A streamed answer (one choice: several are refused on streams). */
async function streamOpenAi(context: ServerContext, request: FastifyRequest, reply: FastifyReply, call: GenerationCall, dialect: Dialect, model: string, extras: OpenAiExtras): Promise<unknown> {
  const prepared = await startCall(context, request, reply, call);
  const shape = responseShape(context, dialect, model);
  const chunkObject = dialect === 'chat' ? 'chat.completion.chunk' : 'text_completion';
  const record = (done: DoneEvent): void => void recordDone(context, prepared, done);
  const logprobs = collectorFor(call, dialect, extras);
  let events: EventStream | null = null;
  // with stream_options.include_usage, every chunk has usage: null and a last one (no choices) carries it
  const usageField = extras.includeUsage ? { usage: null } : {};
  const sendChunk = (choices: Record<string, unknown>[], extra: Record<string, unknown>): void => {
    const chunk = { id: shape.id, object: chunkObject, created: shape.created, model, system_fingerprint: shape.fingerprint, choices, ...extra };
    events?.send(`data: ${JSON.stringify(chunk)}\n\n`);
  };
  const send = (choice: Record<string, unknown>): void => sendChunk([choice], usageField);
  const text = new StopSafeText(call.stop);
  let first = true;
  try {
    events = openEventStream(reply, { 'x-model-id': headerValue(context.engine.info.modelId) });
    if (call.returnFullText) {
      send(choiceChunk(dialect, call.prompt, null, first));
      first = false;
    }
    let done: DoneEvent | null = null;
    // a token's logprobs go out once text from its start on has been sent: held back with the text that may begin
    // a stop (a stop's tokens are left out of the answer's logprobs, as its text is)
    const pending: LogprobEntry[] = [];
    const answerStart = answerStartOf(call);
    for await (const event of eventsOf(prepared.started)) {
      if (event.type === 'token') {
        // the decoded text only: a special token's text is its raw form (<|end_of_text|>), which the final text skips
        const piece = text.push(event.token.special ? '' : event.token.text, event.stopCut);
        const added = logprobs?.add(event.token, event.alternatives);
        if (added) pending.push(added);
        let ready = 0;
        while (ready < pending.length && pending[ready]!.offset - answerStart < text.sentLength) ready++;
        const entry = logprobs && ready > 0 ? logprobs.render(pending.splice(0, ready)) : null;
        if (piece !== '' || first || entry) {
          send(choiceChunk(dialect, piece, null, first, entry));
          first = false;
        }
      } else {
        done = event;
      }
    }
    if (!done) throw toSoppuError(new Error('generation ended without a final event'));
    const finalDone: DoneEvent = done;
    logprobs?.finish(finalDone.generatedText, answerStart);
    const rest = pending.filter((e) => inAnswer(e, answerStart + finalDone.generatedText.length, finalDone.stopToken));
    send(choiceChunk(dialect, text.finish(done.generatedText), toOpenAiFinishReason(done.finishReason), first, logprobs && rest.length > 0 ? logprobs.render(rest) : null));
    if (extras.includeUsage) sendChunk([], { usage: toUsage(done) });
    events.send('data: [DONE]\n\n');
    record(done);
  } catch (e) {
    if (!events) throw e; // nothing sent yet: the error handler answers with a real HTTP error
    const error = toSoppuError(e);
    context.metrics.requestFailure.inc({ err: failureLabel(error) });
    events.send(`data: ${JSON.stringify(openAiErrorBody(error))}\n\n`);
  } finally {
    events?.end();
    await closeGeneration(prepared.started);
  }
  return undefined;
}

export function registerOpenAiRoutes(app: FastifyInstance, context: ServerContext, schemas: Schemas): void {
  const baseModelId = context.engine.info.modelId;
  const extrasOf = (body: OpenAiCompletionBody | OpenAiChatBody, dialect: Dialect): OpenAiExtras => ({
    logprobs: openAiLogprobs(body, dialect),
    includeUsage: body.stream_options?.include_usage === true,
    ...(context.engine.tokenBytes ? { tokenBytes: (id: number) => context.engine.tokenBytes!(id) } : {}),
  });
  /** A stream of its one choice, or the whole answer of every choice (n per prompt). */
  const run = (request: FastifyRequest, reply: FastifyReply, calls: readonly GenerationCall[], dialect: Dialect, body: OpenAiCompletionBody | OpenAiChatBody): Promise<unknown> => {
    const model = body.model ?? baseModelId;
    if (body.stream === true) return streamOpenAi(context, request, reply, calls[0]!, dialect, model, extrasOf(body, dialect));
    const perPrompt = body.n ?? 1;
    return runOpenAiChoices(context, request, reply, calls, calls.map((_, i) => Math.floor(i / perPrompt)), dialect, model, extrasOf(body, dialect));
  };
  app.post<{ Body: OpenAiCompletionBody }>('/v1/completions', { schema: { body: schemas.completions }, config: { generation: true } }, (request, reply) => {
    // token ids: their text is what echo returns (ids outside the vocabulary decode to nothing; the engine refuses them)
    const calls = openAiCompletionCalls(request.body, baseModelId).map((call) => (call.promptIds ? { ...call, prompt: context.engine.detokenize(call.promptIds) } : call));
    return run(request, reply, calls, 'completion', request.body);
  });
  app.post<{ Body: OpenAiChatBody }>('/v1/chat/completions', { schema: { body: schemas.chat }, config: { generation: true } }, (request, reply) => {
    const messages = chatMessages(request.body);
    // before templating: text that cannot fit is refused without rendering it
    refuseUntokenizable(messages.map((message) => message.content).join(''), context.options.maxInputTokens, context.engine.info.maxTokenChars);
    const prompt = context.engine.applyChatTemplate(messages, true);
    return run(request, reply, openAiChatCalls(request.body, prompt, baseModelId), 'chat', request.body);
  });
  /** A model object as /v1/models lists it: the base model, or an adapter with its cache status. */
  const modelObject = (adapter: AdapterStatus | null): Record<string, unknown> =>
    adapter === null
      ? { id: baseModelId, object: 'model', created: 0, owned_by: 'soppu', root: baseModelId, parent: null, status: { tier: 'resident', storage: 'base', pinned: true } }
      : {
          id: adapter.id,
          object: 'model',
          created: 0,
          owned_by: 'soppu',
          root: adapter.id,
          parent: baseModelId,
          status: { tier: adapter.tier, storage: adapter.storage, pinned: adapter.pinned, ...(adapter.error ? { error: adapter.error } : {}) },
        };
  app.get('/v1/models', async (request) => {
    const caller = callerOf(request);
    const data = [modelObject(null), ...context.engine.listAdapters().filter((adapter) => caller.mayUse(adapter.id)).map(modelObject)];
    return { object: 'list', data };
  });
  // OpenAI's models.retrieve; ids may hold '/', so the rest of the path is the id
  app.get<{ Params: { '*': string } }>('/v1/models/*', async (request) => {
    const id = request.params['*'];
    if (id === baseModelId) return modelObject(null);
    const adapter = callerOf(request).mayUse(id) ? context.engine.listAdapters().find((a) => a.id === id) : undefined;
    if (!adapter) throw adapterNotFound(id);
    return modelObject(adapter);
  });
}
