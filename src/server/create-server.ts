/**
 * Builds the HTTP server over an Engine: LoRAX routes, OpenAI routes, adapter management, health,
 * info and metrics; auth on every non-public route; errors rendered in one place.
 */
import Fastify, { type FastifyInstance } from 'fastify';
import type { Engine } from '../engine/engine-types.js';
import { SoppuError } from '../errors/soppu-error.js';
import { OPEN_ACCESS_CALLER } from './access-control.js';
import { ARCHIVE_CONTENT_TYPES, registerAdminRoutes } from './admin-routes.js';
import { errorResponse, failureLabel } from './error-response.js';
import { GenerationService } from './generation-service.js';
import { registerLoraxRoutes } from './lorax-routes.js';
import { registerOpenAiRoutes } from './openai-routes.js';
import { buildSchemas } from './request-schemas.js';
import type { ServerContext } from './server-context.js';
import { ServerMetrics } from './server-metrics.js';
import type { ServerOptions } from './server-options.js';

export interface SoppuServer {
  readonly app: FastifyInstance;
  readonly context: ServerContext;
  /** Stops accepting generations (503), lets running ones finish within the deadline, closes the listener. */
  drain(deadlineMs?: number): Promise<void>;
}

const PUBLIC_PATHS = new Set(['/health', '/ping', '/info']);

/** How long a client may take to send a request (headers and body; a 512 MB upload at ~5 MB/s fits). */
const REQUEST_TIMEOUT_MS = 120_000;

export function createServer(engine: Engine, options: ServerOptions, logger = false): SoppuServer {
  const limits: ServerOptions = {
    ...options,
    maxInputTokens: Math.min(options.maxInputTokens, engine.info.maxInputTokens),
    maxTotalTokens: Math.min(options.maxTotalTokens, engine.info.maxTotalTokens),
  };
  const app = Fastify({
    logger,
    bodyLimit: limits.maxBodyBytes,
    forceCloseConnections: 'idle',
    // a client must send its whole request within this (a body trickled a byte at a time held its socket and
    // buffer forever); answers, streams included, are not bound by it
    requestTimeout: REQUEST_TIMEOUT_MS,
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
  });
  const service = new GenerationService(engine, limits);
  const metrics = new ServerMetrics(engine, () => service.running);
  app.addHook('onClose', async () => metrics.close());
  const context: ServerContext = { engine, options: limits, service, metrics };
  const schemas = buildSchemas(limits);

  app.decorateRequest('caller', null);
  // no bodyLimit of its own: the server's applies on every route but the upload's, which sets maxUploadBytes (a
  // parser's limit would let any route buffer an archive-typed body that large before validation)
  app.addContentTypeParser(ARCHIVE_CONTENT_TYPES, { parseAs: 'buffer' }, (_request, body, done) => done(null, body));

  app.addHook('onRequest', async (request) => {
    const config = request.routeOptions.config;
    if (config.generation === true) metrics.requestCount.inc();
    const isPublic = config.public === true || PUBLIC_PATHS.has(request.routeOptions.url ?? '') || (request.method === 'GET' && request.routeOptions.url === '/');
    if (!limits.accessControl) {
      request.caller = OPEN_ACCESS_CALLER;
      return;
    }
    const caller = limits.accessControl.resolve(request.headers.authorization);
    request.caller = caller;
    if (isPublic) return;
    if (!caller) throw new SoppuError('UNAUTHORIZED', 'Missing or invalid API key: send `Authorization: Bearer <key>`');
    if (config.admin === true && caller.role !== 'admin') throw new SoppuError('FORBIDDEN', 'This route needs an admin API key');
  });

  app.setErrorHandler((error, request, reply) => {
    const { status, body, error: soppuError } = errorResponse(error, request.url, request.routeOptions.config.admin === true);
    if (request.routeOptions.config.generation === true) metrics.requestFailure.inc({ err: failureLabel(soppuError) });
    if (status >= 500 && logger) request.log.error(error);
    void reply.code(status).send(body);
  });
  app.setNotFoundHandler((request, reply) => {
    const { body } = errorResponse(new SoppuError('VALIDATION', `No route ${request.method} ${request.url.split('?')[0]}`, { field: 'url' }), request.url);
    void reply.code(404).send(body); // both dialects: OpenAI's would otherwise be its 400 for a refused request
  });

  const health = async (_request: unknown, reply: { code(n: number): { send(b?: unknown): unknown } }): Promise<unknown> =>
    service.isDraining ? reply.code(503).send({ error: 'unhealthy', error_type: 'healthcheck' }) : reply.code(200).send();
  app.get('/health', health);
  app.get('/ping', health);
  app.get('/', health);

  app.get('/info', async () => ({
    model_id: engine.info.modelId,
    model_sha: null,
    model_dtype: engine.info.modelDtype,
    model_device_type: 'cpu',
    model_pipeline_tag: 'text-generation',
    max_concurrent_requests: limits.maxConcurrentRequests,
    max_best_of: 1,
    max_stop_sequences: limits.maxStopSequences,
    max_input_length: limits.maxInputTokens,
    max_total_tokens: limits.maxTotalTokens,
    // the scheduler admits waiting requests at every step (their prefill chunks join the decode rows), so no
    // ratio of waiting to running and no count of decode tokens holds them back (typed clients need numbers)
    waiting_served_ratio: 0,
    max_batch_total_tokens: engine.info.maxBatchTokens,
    max_waiting_tokens: 0,
    validation_workers: 1,
    eager_prefill: true,
    version: limits.version,
    sha: null,
    docker_label: null,
    request_logger_url: null,
    kernel: engine.info.kernel,
    // not LoRAX's: the dtypes resident adapters are held in (PEFT folders; a bank's), as --lora-dtype resolved
    lora_dtype: engine.info.loraDtype,
    bank_dtype: engine.info.bankDtype,
    auth: limits.accessControl ? 'api_keys' : 'none',
  }));

  // per-adapter labels name adapters, so metrics need an admin key when keys are configured
  app.get<{ Querystring: { format?: string } }>('/metrics', { config: { admin: true } }, async (request, reply) => {
    if (request.query.format === 'json' || request.headers.accept === 'application/json') return metrics.registry.getMetricsAsJSON();
    void reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  registerLoraxRoutes(app, context, schemas);
  registerOpenAiRoutes(app, context, schemas);
  registerAdminRoutes(app, context, schemas);

  let draining: Promise<void> | null = null;
  const drain = (deadlineMs = limits.drainDeadlineMs): Promise<void> => {
    draining ??= (async () => {
      const started = Date.now();
      service.startDraining();
      // the listener stays open while running requests finish, so new ones get a 503 (not a refused connection)
      await engine.drain(deadlineMs);
      // close waits for every handler still running (an admin upload begun before the drain) and then for their
      // connections' keep-alive: held to what is left of the deadline, then every connection is closed
      const late = setTimeout(() => app.server.closeAllConnections(), Math.max(0, deadlineMs - (Date.now() - started)));
      try {
        await app.close();
      } finally {
        clearTimeout(late);
      }
    })();
    return draining;
  };
  return { app, context, drain };
}
