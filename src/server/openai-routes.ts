/**
 * OpenAI-compatible routes: /v1/completions, /v1/chat/completions (model = adapter id, or '' / the
 * base model id for the base), and /v1/models listing what this caller may use.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { failureLabel, openAiErrorBody, toSoppuError } from './error-response.js';
import { startCall } from './lorax-routes.js';
import type { buildSchemas } from './request-schemas.js';
import { callerOf, closeGeneration, eventsOf, headerValue, openEventStream, recordSuccess, type EventStream, type ServerContext } from './server-context.js';
import {
  chatMessages,
  fromOpenAiChat,
  fromOpenAiCompletion,
  fullText,
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

function choiceChunk(dialect: Dialect, text: string, finishReason: string | null, first: boolean): Record<string, unknown> {
  if (dialect === 'completion') return { index: 0, text, logprobs: null, finish_reason: finishReason };
  const delta: Record<string, unknown> = first ? { role: 'assistant', content: text } : { content: text };
  return { index: 0, delta, logprobs: null, finish_reason: finishReason };
}

async function runOpenAi(context: ServerContext, request: FastifyRequest, reply: FastifyReply, call: GenerationCall, dialect: Dialect, stream: boolean, model: string): Promise<unknown> {
  const prepared = await startCall(context, request, reply, call);
  const shape: ChunkShape = {
    id: `${dialect === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID()}`,
    created: Math.floor(Date.now() / 1000),
    model,
    fingerprint: `${context.options.version}-native`,
  };
  const object = dialect === 'chat' ? 'chat.completion' : 'text_completion';
  const chunkObject = dialect === 'chat' ? 'chat.completion.chunk' : 'text_completion';
  const record = (done: DoneEvent): void => {
    recordSuccess(context, {
      startedAt: prepared.startedAt,
      validatedAt: prepared.validatedAt,
      firstEventMs: prepared.started.timeToFirstEventMs,
      promptTokens: done.promptTokens,
      generatedTokens: done.generatedTokens,
      maxNewTokens: prepared.started.request.maxNewTokens,
    });
  };
  if (!stream) {
    let done: DoneEvent | null = null;
    for await (const event of eventsOf(prepared.started)) if (event.type === 'done') done = event;
    if (!done) throw toSoppuError(new Error('generation ended without a final event'));
    record(done);
    const text = fullText(call, done);
    const choice =
      dialect === 'chat'
        ? { index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: toOpenAiFinishReason(done.finishReason) }
        : { index: 0, text, logprobs: null, finish_reason: toOpenAiFinishReason(done.finishReason) };
    return { id: shape.id, object, created: shape.created, model, system_fingerprint: shape.fingerprint, choices: [choice], usage: toUsage(done) };
  }
  let events: EventStream | null = null;
  const send = (choice: Record<string, unknown>, extra: Record<string, unknown> = {}): void => {
    const chunk = { id: shape.id, object: chunkObject, created: shape.created, model, system_fingerprint: shape.fingerprint, choices: [choice], ...extra };
    events?.send(`data: ${JSON.stringify(chunk)}\n\n`);
  };
  const text = new StopSafeText(call.stop);
  let first = true;
  try {
    events = openEventStream(reply, { 'x-model-id': headerValue(context.engine.info.modelId) });
    if (call.returnFullText) {
      send(choiceChunk(dialect, call.prompt, null, first));
      first = false;
    }
    let done: DoneEvent | null = null;
    for await (const event of eventsOf(prepared.started)) {
      if (event.type === 'token') {
        // the decoded text only: a special token's text is its raw form (<|end_of_text|>), which the final text skips
        const piece = text.push(event.token.special ? '' : event.token.text);
        if (piece !== '' || first) {
          send(choiceChunk(dialect, piece, null, first));
          first = false;
        }
      } else {
        done = event;
      }
    }
    if (!done) throw toSoppuError(new Error('generation ended without a final event'));
    send(choiceChunk(dialect, text.finish(done.generatedText), toOpenAiFinishReason(done.finishReason), first), { usage: toUsage(done) });
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
  app.post<{ Body: OpenAiCompletionBody }>('/v1/completions', { schema: { body: schemas.completions }, config: { generation: true } }, (request, reply) =>
    runOpenAi(context, request, reply, fromOpenAiCompletion(request.body, baseModelId), 'completion', request.body.stream ?? false, request.body.model ?? baseModelId),
  );
  app.post<{ Body: OpenAiChatBody }>('/v1/chat/completions', { schema: { body: schemas.chat }, config: { generation: true } }, (request, reply) => {
    const prompt = context.engine.applyChatTemplate(chatMessages(request.body), true);
    return runOpenAi(context, request, reply, fromOpenAiChat(request.body, prompt, baseModelId), 'chat', request.body.stream ?? false, request.body.model ?? baseModelId);
  });
  app.get('/v1/models', async (request) => {
    const caller = callerOf(request);
    const data: Record<string, unknown>[] = [
      { id: baseModelId, object: 'model', created: 0, owned_by: 'soppu', root: baseModelId, parent: null, status: { tier: 'resident', storage: 'base', pinned: true } },
    ];
    for (const adapter of context.engine.listAdapters()) {
      if (!caller.mayUse(adapter.id)) continue;
      data.push({
        id: adapter.id,
        object: 'model',
        created: 0,
        owned_by: 'soppu',
        root: adapter.id,
        parent: baseModelId,
        status: { tier: adapter.tier, storage: adapter.storage, pinned: adapter.pinned, ...(adapter.error ? { error: adapter.error } : {}) },
      });
    }
    return { object: 'list', data };
  });
}
