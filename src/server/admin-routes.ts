/**
 * Adapter management (admin keys only): list with tier, size and errors; register from a tar /
 * tar.gz upload or from a path inside the configured adapter directories (hot reload when the id
 * exists); remove; pin and unpin; reload the keys file.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { AdapterStatus } from '../engine/engine-types.js';
import { isSoppuError, SoppuError } from '../errors/soppu-error.js';
import { adapterNotFound } from './generation-service.js';
import { confinePath } from './path-confinement.js';
import { ADAPTER_ID_PATTERN, type buildSchemas } from './request-schemas.js';
import type { ServerContext } from './server-context.js';
import { parseTar, writeAdapterFiles } from './tar-extract.js';

type Schemas = ReturnType<typeof buildSchemas>;

/** Errors that describe the adapter files themselves (in an upload: a bad request, not a server failure). */
const UPLOAD_CONTENT_ERRORS = new Set(['ADAPTER_CONFIG', 'ADAPTER_TENSORS', 'ADAPTER_UNSUPPORTED', 'ADAPTER_INCOMPATIBLE', 'FILE_NOT_FOUND', 'SAFETENSORS_HEADER', 'SAFETENSORS_TENSOR', 'SAFETENSORS_DTYPE']);

export const ARCHIVE_CONTENT_TYPES = ['application/x-tar', 'application/gzip', 'application/x-gzip', 'application/octet-stream'];

function toWireStatus(adapter: AdapterStatus): Record<string, unknown> {
  return {
    id: adapter.id,
    source: adapter.source,
    storage: adapter.storage,
    tier: adapter.tier,
    pinned: adapter.pinned,
    size_bytes: adapter.bytes,
    error: adapter.error ?? null,
  };
}

function checkId(id: unknown, field: string): string {
  if (typeof id !== 'string' || id.length === 0 || id.length > 256 || !ADAPTER_ID_PATTERN.test(id) || id.split('/').includes('..')) {
    throw new SoppuError('VALIDATION', `Input validation error: \`${field}\` must be 1-256 characters of [A-Za-z0-9._/@:+-] starting with a letter or digit`, { field });
  }
  return id;
}

/** A true/false query parameter of an upload, `fallback` when absent. */
function queryBoolean(value: string | undefined, field: string, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (value !== 'true' && value !== 'false') throw new SoppuError('VALIDATION', `Input validation error: \`${field}\` must be true or false; got '${value}'`, { field });
  return value === 'true';
}

/** A boolean field of a JSON registration, `fallback` when absent. */
function bodyBoolean(value: unknown, field: string, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') throw new SoppuError('VALIDATION', `Input validation error: \`${field}\` must be a boolean`, { field });
  return value;
}

export function registerAdminRoutes(app: FastifyInstance, context: ServerContext, schemas: Schemas): void {
  const { engine, options } = context;
  // a change to what is served is refused once the server drains (before an upload's body is read): it would
  // outlive the drain's deadline, and be applied to a server that is going away
  const notWhileDraining = async (): Promise<void> => {
    if (context.service.isDraining) throw new SoppuError('SHUTTING_DOWN', 'Server is shutting down and accepts no adapter changes');
  };

  app.get('/adapters', { config: { admin: true } }, async () => ({ adapters: engine.listAdapters().map(toWireStatus) }));

  app.post<{ Body: unknown; Querystring: { id?: string; compress?: string; ignore_base_model?: string } }>(
    '/adapters',
    { config: { admin: true }, bodyLimit: options.maxUploadBytes, onRequest: notWhileDraining },
    async (request, reply) => {
      let id: string;
      let dir: string;
      let compress: boolean;
      let uploadedRoot: string | null = null;
      // as the JSON form refuses an unknown field: a misspelled compress=false must not write into the bank; and a JSON
      // registration takes its fields from the body only (a compress=false in its query was dropped)
      const queryKeys = Object.keys(request.query);
      const archive = Buffer.isBuffer(request.body);
      const unknownQuery = archive ? queryKeys.filter((key) => key !== 'id' && key !== 'compress' && key !== 'ignore_base_model') : queryKeys;
      if (unknownQuery.length > 0) {
        throw new SoppuError('VALIDATION', archive
          ? `Input validation error: unknown query parameter \`${unknownQuery[0]}\` (an upload takes id, compress and ignore_base_model)`
          : `Input validation error: query parameter \`${unknownQuery[0]}\` on a JSON registration: give id, path, compress and ignore_base_model in the body`, { field: String(unknownQuery[0]) });
      }
      // as `bank add --ignore-base-model`: the adapter names the bank's model otherwise (a folder and a hub id)
      let ignoreBaseModel: boolean;
      if (Buffer.isBuffer(request.body)) {
        ignoreBaseModel = queryBoolean(request.query.ignore_base_model, 'ignore_base_model', false);
        id = checkId(request.query.id, 'id');
        compress = queryBoolean(request.query.compress, 'compress', true);
        const files = parseTar(request.body, { maxEntries: 64, maxTotalBytes: options.maxUploadBytes * 4 }, `upload for '${id}'`);
        mkdirSync(options.uploadDir, { recursive: true });
        // the id's first 64 characters name the folder (a 256-character id and mkdtemp's suffix pass the 255-byte limit)
        uploadedRoot = mkdtempSync(path.join(options.uploadDir, `${id.slice(0, 64).replace(/[^A-Za-z0-9._-]/g, '_')}-`));
        try {
          dir = writeAdapterFiles(files, uploadedRoot, `upload for '${id}'`);
        } catch (e) {
          rmSync(uploadedRoot, { recursive: true, force: true });
          throw e;
        }
      } else {
        const body = request.body as { id?: unknown; path?: unknown; compress?: unknown; ignore_base_model?: unknown } | null;
        if (body === null || typeof body !== 'object' || Array.isArray(body)) {
          throw new SoppuError('VALIDATION', 'Input validation error: body must be a tar/tar.gz archive or {"id", "path", "compress"}', { field: 'body' });
        }
        const unknown = Object.keys(body).filter((k) => !Object.hasOwn(schemas.registerAdapter.properties, k));
        if (unknown.length > 0) throw new SoppuError('VALIDATION', `Input validation error: unknown field \`${unknown[0]}\``, { field: String(unknown[0]) });
        id = checkId(body.id, 'id');
        if (typeof body.path !== 'string' || body.path === '') throw new SoppuError('VALIDATION', 'Input validation error: `path` must be a non-empty string', { field: 'path' });
        compress = bodyBoolean(body.compress, 'compress', true);
        ignoreBaseModel = bodyBoolean(body.ignore_base_model, 'ignore_base_model', false);
        // an admin is told why (a user's request names no such folder: it gets a 404 that reveals nothing)
        if (options.adapterDirs.length === 0) {
          throw new SoppuError('VALIDATION', 'Input validation error: `path` needs the server started with --adapters DIR: a registered path must lie inside one of those folders (or upload the adapter as a tar archive)', { field: 'path' });
        }
        try {
          dir = confinePath(body.path, options.adapterDirs, 'path');
        } catch (e) {
          if (!isSoppuError(e, 'ADAPTER_NOT_FOUND')) throw e;
          throw new SoppuError('VALIDATION', `Input validation error: \`path\` ${JSON.stringify(body.path)} is not a folder inside the --adapters directories (${options.adapterDirs.join(', ')})`, { field: 'path' });
        }
      }
      // a folder this server unpacked goes once the engine is done with it: after a compress registration,
      // else once the registration is replaced or removed and no request that holds it still has to load it
      const unpacked = uploadedRoot;
      const onRelease = unpacked ? () => rmSync(unpacked, { recursive: true, force: true }) : undefined;
      let status: AdapterStatus;
      try {
        status = await engine.registerAdapter(id, dir, { compress, ...(ignoreBaseModel ? { ignoreBaseModel } : {}), ...(onRelease ? { onRelease } : {}) });
      } catch (e) {
        onRelease?.();
        // what is wrong with an uploaded adapter is the caller's to fix (422), named by its place in the
        // archive, not by the folder the server unpacked it in
        if (isSoppuError(e) && UPLOAD_CONTENT_ERRORS.has(e.code)) {
          if (!unpacked) throw new SoppuError('VALIDATION', `Input validation error: the adapter at \`path\`: ${e.message}`, { field: 'path' });
          // the archive's files by their names in it; a message about the adapter as a whole names the upload
          const message = e.message.split(`${unpacked}: `).join('').split(unpacked + path.sep).join('').split(unpacked).join('.');
          throw new SoppuError('VALIDATION', `Input validation error: upload for '${id}': ${message}`, { field: 'body' });
        }
        throw e;
      }
      reply.code(201);
      return toWireStatus(status);
    },
  );

  app.delete<{ Params: { '*': string } }>('/adapters/*', { config: { admin: true }, onRequest: notWhileDraining }, async (request, reply) => {
    const id = checkId(request.params['*'], 'id');
    if (!engine.hasAdapter(id)) throw adapterNotFound(id);
    await engine.removeAdapter(id);
    reply.code(204);
    return undefined;
  });

  // keys.json read again (as SIGHUP does in `soppu serve`): a user added or removed without a restart
  app.post('/keys/reload', { config: { admin: true } }, async () => {
    if (!options.accessControl) throw new SoppuError('CONFIG', 'the server runs without --auth: there is no keys file to reload', { field: 'auth' });
    try {
      const { keys, warnings } = options.accessControl.reload();
      return { keys, warnings };
    } catch (e) {
      // a keys file missing mid-save (an editor renaming over it) is the request's problem, not a generation failure
      if (isSoppuError(e, 'FILE_NOT_FOUND')) throw new SoppuError('CONFIG', e.message, { field: 'auth', file: options.accessControl.file ?? '' }, { cause: e });
      throw e;
    }
  });

  // after `soppu bank add/rm/refit` changed the bank on disk (SIGHUP does the same)
  app.post('/bank/reload', { config: { admin: true }, onRequest: notWhileDraining }, async () => {
    if (!engine.reloadBank) throw new SoppuError('CONFIG', 'this engine cannot reload a bank', { field: 'bank' });
    return engine.reloadBank();
  });

  for (const [route, pinned] of [['/adapters/pin', true], ['/adapters/unpin', false]] as const) {
    app.post<{ Body: { id: string } }>(
      route,
      {
        config: { admin: true },
        onRequest: notWhileDraining,
        schema: { body: { type: 'object', required: ['id'], additionalProperties: false, properties: { id: { type: 'string', minLength: 1 } } } },
      },
      async (request) => {
        const id = checkId(request.body.id, 'id');
        if (!engine.hasAdapter(id)) throw adapterNotFound(id);
        await engine.pinAdapter(id, pinned);
        const status = engine.listAdapters().find((a) => a.id === id);
        return status ? toWireStatus(status) : { id, pinned };
      },
    );
  }
}
