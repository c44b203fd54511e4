/**
 * What every route module needs: the engine, the limits, the generation service, the metrics, and
 * the shared request plumbing (caller lookup, disconnect → abort, event iteration).
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine, GenerateEvent } from '../engine/engine-types.js';
import { SoppuError } from '../errors/soppu-error.js';
import { OPEN_ACCESS_CALLER, type Caller } from './access-control.js';
import type { GenerationService, StartedGeneration } from './generation-service.js';
import type { ServerMetrics } from './server-metrics.js';
import type { ServerOptions } from './server-options.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by the auth hook on every non-public route. */
    caller: Caller | null;
  }
  interface FastifyContextConfig {
    /** No API key needed (health, info). */
    public?: boolean;
    /** Admin keys only. */
    admin?: boolean;
    /** Counts in lorax_request_* metrics. */
    generation?: boolean;
  }
}

export interface ServerContext {
  readonly engine: Engine;
  readonly options: ServerOptions;
  readonly service: GenerationService;
  readonly metrics: ServerMetrics;
}

/** The authenticated caller (the auth hook guarantees one on non-public routes). */
export function callerOf(request: FastifyRequest): Caller {
  if (request.caller) return request.caller;
  throw new SoppuError('UNAUTHORIZED', 'Missing or invalid API key');
}

export { OPEN_ACCESS_CALLER };

/** An AbortController fired when the client goes away before the response is complete. */
export function abortOnDisconnect(reply: FastifyReply): AbortController {
  const controller = new AbortController();
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort(new SoppuError('CANCELLED', 'client disconnected'));
  });
  reply.raw.on('error', () => controller.abort(new SoppuError('CANCELLED', 'client connection failed')));
  // gone before the handler ran: 'close' has fired already and will not again
  const socket = reply.request.raw.socket as { destroyed?: boolean } | null;
  if (!socket || socket.destroyed) controller.abort(new SoppuError('CANCELLED', 'client disconnected'));
  return controller;
}

/** All events of a started generation, the already-fetched first one included. */
export async function* eventsOf(started: StartedGeneration): AsyncGenerator<GenerateEvent> {
  let finished = false;
  try {
    if (started.first.done) {
      finished = true;
      return;
    }
    yield started.first.value;
    for (;;) {
      const next = await started.iterator.next();
      if (next.done) {
        finished = true;
        return;
      }
      yield next.value;
      if (next.value.type === 'done') {
        finished = true;
        return;
      }
    }
  } finally {
    if (!finished) await started.iterator.return?.();
    started.release();
  }
}

/**
 * Cancels `started` unless it ran to its end, and frees its admission slot. For the `finally` of a
 * route: eventsOf does both only once iterated, so a throw before that (a failed response head)
 * would otherwise hold the slot and leave the generation running unread. Safe after eventsOf.
 */
export async function closeGeneration(started: StartedGeneration): Promise<void> {
  try {
    await started.iterator.return?.();
  } finally {
    started.release();
  }
}

/**
 * `text` made safe for a response header. Printable ASCII passes unchanged; anything else (non-ASCII,
 * control characters) is percent-encoded whole, as encodeURIComponent does, since Node throws
 * ERR_INVALID_CHAR on non-Latin-1 text (and writes Latin-1 as bytes clients misread): `adapter-日本`
 * reads `adapter-%E6%97%A5%E6%9C%AC`, which decodeURIComponent turns back. Use it for every header
 * that carries caller- or operator-chosen text (adapter ids, local folder names, model ids).
 */
export function headerValue(text: string): string {
  if (/^[\x20-\x7e]*$/.test(text)) return text;
  return encodeURIComponent(text.replace(/\p{Cs}/gu, '\ufffd')); // a lone surrogate would make encodeURIComponent throw
}

/** A Server-Sent Events response opened by openEventStream. */
export interface EventStream {
  send(line: string): void;
  end(): void;
}

/**
 * Opens a Server-Sent Events response (bypassing fastify's reply pipeline). The head is written
 * before the hijack, so if it throws nothing was sent and fastify still owns the reply: rethrow and
 * its error handler answers. Call it inside the try/finally that closes the generation.
 */
export function openEventStream(reply: FastifyReply, headers: Record<string, string>): EventStream {
  const raw = reply.raw;
  raw.writeHead(200, {
    'content-type': 'text/event-stream',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
    ...headers,
  });
  reply.hijack();
  raw.on('error', () => undefined);
  return {
    send(line: string) {
      if (!raw.destroyed) raw.write(line);
    },
    end() {
      if (!raw.destroyed) raw.end();
    },
  };
}

/** Records a finished generation in the LoRAX request metrics. */
export function recordSuccess(
  context: ServerContext,
  timing: { startedAt: number; validatedAt: number; firstEventMs: number; queueMs?: number; promptTokens: number; generatedTokens: number; maxNewTokens: number; inputs?: number },
): { totalMs: number; queueMs: number; inferenceMs: number; perTokenMs: number } {
  const now = performance.now();
  const totalMs = now - timing.startedAt;
  // validation, then queue, then inference: the three add up to the request's duration. As LoRAX: the queue is
  // the wait before the engine's first step with the request, inference the rest (prefill included), and the
  // time per token inference / generated tokens. An engine that does not report its queue time: the queue runs
  // to the first token, and the time per token is between tokens (none for one token)
  const engineQueue = timing.queueMs !== undefined;
  const queueMs = timing.queueMs ?? timing.firstEventMs;
  const inferenceMs = Math.max(0, now - timing.validatedAt - queueMs);
  const tokens = timing.generatedTokens;
  const perTokenMs = engineQueue ? (tokens > 0 ? inferenceMs / tokens : 0) : tokens > 1 ? inferenceMs / (tokens - 1) : 0;
  const m = context.metrics;
  m.requestSuccess.inc();
  m.requestDuration.observe(totalMs / 1000);
  m.validationDuration.observe((timing.validatedAt - timing.startedAt) / 1000);
  m.queueDuration.observe(queueMs / 1000);
  m.inferenceDuration.observe(inferenceMs / 1000);
  if (engineQueue ? tokens > 0 : tokens > 1) m.meanTimePerToken.observe(perTokenMs / 1000);
  m.inputLength.observe(timing.promptTokens);
  m.generatedTokens.observe(timing.generatedTokens);
  m.maxNewTokens.observe(timing.maxNewTokens);
  m.skippedTokens.observe(0); // no prompt token is skipped (the details' skipped_tokens)
  m.inputCount.observe(timing.inputs ?? 1);
  return { totalMs, queueMs, inferenceMs, perTokenMs };
}
