/**
 * LoRAX routes: /generate, /generate_stream, the compat POST / (and /invocations), /tokenize.
 * Unlike LoRAX, every error before the first token is a real HTTP error, not a 200 stream.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { failureLabel, loraxErrorBody, toSoppuError } from './error-response.js';
import { refuseUntokenizable, type StartedGeneration } from './generation-service.js';
import { abortOnDisconnect, callerOf, closeGeneration, eventsOf, headerValue, openEventStream, recordSuccess, type EventStream, type ServerContext } from './server-context.js';
import type { buildSchemas } from './request-schemas.js';
import { asLoraxDone, fromLoraxBody, toLoraxResponse, toLoraxStreamEvent, type CollectedToken, type DoneEvent, type GenerationCall, type LoraxGenerateBody } from './wire.js';

type Schemas = ReturnType<typeof buildSchemas>;

export interface Prepared {
  readonly call: GenerationCall;
  readonly started: StartedGeneration;
  readonly startedAt: number;
  readonly validatedAt: number;
}

/** Validates, checks access and starts the engine; throws (→ HTTP error) before the first token. */
/** Validates and starts one generation; `controller` (default: one of its own) cancels it when the client goes. */
export async function startCall(context: ServerContext, request: FastifyRequest, reply: FastifyReply, call: GenerationCall, controller = abortOnDisconnect(reply)): Promise<Prepared> {
  const startedAt = performance.now();
  const engineRequest = context.service.prepare(call, callerOf(request), controller.signal);
  const validatedAt = performance.now();
  const started = await context.service.start(engineRequest);
  return { call, started, startedAt, validatedAt };
}

/** Records a finished generation in the metrics; returns its timing (for the LoRAX headers). */
export function recordDone(context: ServerContext, prepared: Prepared, done: DoneEvent): ReturnType<typeof recordSuccess> {
  return recordSuccess(context, {
    startedAt: prepared.startedAt,
    validatedAt: prepared.validatedAt,
    firstEventMs: prepared.started.timeToFirstEventMs,
    ...(done.queueMs !== undefined ? { queueMs: done.queueMs } : {}),
    promptTokens: done.promptTokens,
    generatedTokens: done.generatedTokens,
    maxNewTokens: prepared.started.request.maxNewTokens,
  });
}

function identityHeaders(context: ServerContext, call: GenerationCall): Record<string, string> {
  const headers: Record<string, string> = { 'x-compute-type': 'cpu', 'x-model-id': headerValue(context.engine.info.modelId) };
  if (call.adapterId !== '') {
    headers['x-adapter-id'] = headerValue(call.adapterId); // a local folder name may be any text
    headers['x-adapter-source'] = call.adapterSource ?? 'bank';
  }
  return headers;
}

async function generateJson(context: ServerContext, request: FastifyRequest, reply: FastifyReply, call: GenerationCall): Promise<Record<string, unknown>> {
  const prepared = await startCall(context, request, reply, call);
  const tokens: CollectedToken[] = [];
  let done: DoneEvent | null = null;
  for await (const event of eventsOf(prepared.started)) {
    if (event.type === 'token') tokens.push({ token: event.token, alternatives: event.alternatives });
    else done = event;
  }
  if (!done) throw toSoppuError(new Error('generation ended without a final event'));
  const timing = recordDone(context, prepared, done);
  reply.headers({
    ...identityHeaders(context, call),
    'x-compute-time': Math.round(timing.totalMs), // ms, as every timing header (TGI: total_time.as_millis())
    'x-compute-characters': String(call.prompt.length),
    'x-total-time': Math.round(timing.totalMs),
    'x-validation-time': Math.round(prepared.validatedAt - prepared.startedAt),
    'x-queue-time': Math.round(timing.queueMs),
    'x-inference-time': Math.round(timing.inferenceMs),
    'x-time-per-token': Math.round(timing.perTokenMs),
    'x-time-to-first-token': Math.round(prepared.started.timeToFirstEventMs),
    'x-time-per-output-token': Math.round(timing.perTokenMs),
    'x-prompt-tokens': done.promptTokens,
    'x-generated-tokens': done.generatedTokens,
    'x-skipped-tokens': 0,
    'x-total-tokens': done.promptTokens + done.generatedTokens,
  });
  return toLoraxResponse(call, asLoraxDone(done, prepared.started.request.maxNewTokens), tokens);
}

async function generateStream(context: ServerContext, request: FastifyRequest, reply: FastifyReply, call: GenerationCall): Promise<void> {
  const prepared = await startCall(context, request, reply, call);
  // LoRAX puts the last token and the final text in one event, so each token waits for the next event
  let held: CollectedToken | null = null;
  let done: DoneEvent | null = null;
  let stream: EventStream | null = null;
  try {
    stream = openEventStream(reply, { ...identityHeaders(context, call), 'x-compute-characters': String(call.prompt.length) });
    for await (const event of eventsOf(prepared.started)) {
      if (event.type === 'token') {
        if (held) stream.send(`data:${JSON.stringify(toLoraxStreamEvent(call, held, null))}\n\n`);
        held = { token: event.token, alternatives: event.alternatives };
      } else {
        done = event;
      }
    }
    if (!done) throw toSoppuError(new Error('generation ended without a final event'));
    const final = asLoraxDone(done, prepared.started.request.maxNewTokens);
    const last = held ? toLoraxStreamEvent(call, held, final) : { ...toLoraxStreamEvent(call, { token: { id: 0, text: '', logprob: 0, special: true } }, final), token: null };
    stream.send(`data:${JSON.stringify(last)}\n\n`);
    recordDone(context, prepared, done);
  } catch (e) {
    if (!stream) throw e; // nothing sent yet: the error handler answers with a real HTTP error
    const error = toSoppuError(e);
    context.metrics.requestFailure.inc({ err: failureLabel(error) });
    stream.send(`data:${JSON.stringify(loraxErrorBody(error))}\n\n`);
  } finally {
    stream?.end();
    await closeGeneration(prepared.started);
  }
}

export function registerLoraxRoutes(app: FastifyInstance, context: ServerContext, schemas: Schemas): void {
  app.post<{ Body: LoraxGenerateBody }>('/generate', { schema: { body: schemas.generate }, config: { generation: true } }, (request, reply) =>
    generateJson(context, request, reply, fromLoraxBody(request.body, false)),
  );
  app.post<{ Body: LoraxGenerateBody }>('/generate_stream', { schema: { body: schemas.generate }, config: { generation: true } }, (request, reply) =>
    generateStream(context, request, reply, fromLoraxBody(request.body, true)),
  );
  const compat = async (request: FastifyRequest<{ Body: LoraxGenerateBody }>, reply: FastifyReply): Promise<unknown> => {
    const stream = request.body.stream ?? false;
    const call = fromLoraxBody(request.body, stream, true); // the text-generation pipeline returns the full text
    if (stream) return generateStream(context, request, reply, call);
    return [await generateJson(context, request, reply, call)];
  };
  app.post<{ Body: LoraxGenerateBody }>('/', { schema: { body: schemas.compat }, config: { generation: true } }, compat);
  app.post<{ Body: LoraxGenerateBody }>('/invocations', { schema: { body: schemas.compat }, config: { generation: true } }, compat);
  app.post<{ Body: { inputs: string; add_special_tokens?: boolean } }>('/tokenize', { schema: { body: schemas.tokenize } }, async (request) => {
    callerOf(request);
    // bounded as prompts are, by max_total_tokens (a 4 MB text answered 205 MB)
    refuseUntokenizable(request.body.inputs, context.options.maxTotalTokens, context.engine.info.maxTokenChars);
    return context.engine.tokenize(request.body.inputs, request.body.add_special_tokens ?? true).tokens.map((t) => ({ id: t.id, text: t.text, start: t.start, stop: t.stop }));
  });
}
