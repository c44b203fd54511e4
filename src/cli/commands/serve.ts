/**
 * `soppu serve`: the HTTP server (LoRAX + OpenAI APIs) over the engine. With no --model it builds a
 * demo once into the cache folder ($SOPPU_CACHE or ~/.cache/soppu/demo): a tiny model, 100
 * generated user adapters compressed into a bank. SIGTERM/SIGINT drain: stop accepting, finish
 * running requests within the deadline, exit 0.
 */
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { compressDirectoriesToBank } from '../../compress/bank-compress.js';
import { createEngine, parseLoraDtype } from '../../engine/engine.js';
import { SoppuError } from '../../errors/soppu-error.js';
import { BASE_SHAPES } from '../../io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../io/fixtures/generate-adapters.js';
import { generateModel } from '../../io/fixtures/generate-model.js';
import { loadLlamaModel } from '../../model/llama-model.js';
import { AccessControl } from '../../server/access-control.js';
import { createServer } from '../../server/create-server.js';
import { DEFAULT_SERVER_OPTIONS } from '../../server/server-options.js';

interface ServeOptions {
  model?: string;
  bank?: string;
  adapters?: string[];
  auth?: string;
  port: string;
  host?: string;
  cache?: string;
  maxConcurrentRequests: string;
  maxRunningRequests: string;
  maxBatchTokens: string;
  maxInputTokens?: string;
  maxTotalTokens?: string;
  maxStopSequences: string;
  kvMemoryMb: string;
  adapterMemoryMb: string;
  blockSize: string;
  loraDtype: string;
  drainDeadlineS: string;
  maxUploadMb: string;
}

function integer(value: string, name: string, min: number): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) throw new SoppuError('CONFIG', `--${name} must be an integer >= ${min}, got '${value}'`, { field: name, limit: min });
  return n;
}

/** Builds (once) the demo model and a bank of 100 compressed user adapters under `cacheDir`. */
export async function ensureDemo(cacheDir: string, log: (line: string) => void): Promise<{ modelDir: string; bankDir: string }> {
  const modelDir = path.join(cacheDir, 'model');
  const bankDir = path.join(cacheDir, 'bank');
  const marker = path.join(cacheDir, 'READY');
  if (existsSync(marker)) return { modelDir, bankDir };
  log(`building the demo (tiny model + 100 compressed user adapters) in ${cacheDir} …`);
  rmSync(cacheDir, { recursive: true, force: true });
  mkdirSync(cacheDir, { recursive: true });
  await generateModel({ out: modelDir, shape: 'tiny', seed: 1 });
  const adapterDirs = await writeGeneratedAdapters(path.join(cacheDir, 'adapters'), 100, { base: BASE_SHAPES.tiny, rank: 8, sharedRank: 4, seed: 2 });
  await compressDirectoriesToBank(
    adapterDirs.map((dir) => `${path.basename(dir)}=${dir}`),
    bankDir,
    { compress: { method: 'jd-diag', maxError: 0.2, seed: 0 } },
  );
  rmSync(path.join(cacheDir, 'adapters'), { recursive: true, force: true });
  writeFileSync(marker, new Date().toISOString());
  return { modelDir, bankDir };
}

export function register(program: Command): void {
  program
    .command('serve')
    .description('serve the model and its adapters over LoRAX- and OpenAI-compatible HTTP APIs')
    .option('--model <dir>', 'model directory (default: build and serve the demo)')
    .option('--bank <dir>', 'compressed adapter bank directory')
    .option('--adapters <dir...>', 'directories that adapter_source=local paths and admin registrations must lie inside')
    .option('--auth <keys.json>', 'API keys file: {"<key>": {"role": "admin"|"user", "adapters": [ids or globs]}}')
    .option('--port <n>', 'port', '8080')
    .option('--host <addr>', 'address to bind (default 127.0.0.1; without --auth only loopback is safe)')
    .option('--cache <dir>', 'demo cache folder (default $SOPPU_CACHE or ~/.cache/soppu/demo)')
    .option('--max-concurrent-requests <n>', 'requests in flight before 429', String(DEFAULT_SERVER_OPTIONS.maxConcurrentRequests))
    .option('--max-running-requests <n>', 'requests decoded together in one batch', '64')
    .option('--max-batch-tokens <n>', 'tokens per forward step', '2048')
    .option('--max-input-tokens <n>', 'prompt tokens allowed (default: model limit − 1, at most 4095)')
    .option('--max-total-tokens <n>', 'prompt + generated tokens allowed (default: model limit, at most 4096)')
    .option('--max-stop-sequences <n>', 'stop sequences per request', String(DEFAULT_SERVER_OPTIONS.maxStopSequences))
    .option('--kv-memory-mb <n>', 'KV-cache budget in MiB', '512')
    .option('--adapter-memory-mb <n>', 'resident adapter budget in MiB', '512')
    .option('--block-size <n>', 'KV-cache block size in positions', '16')
    .option('--lora-dtype <dtype>', 'adapter factors and cores in memory: auto (the model dtype), f32, bf16 or f16', 'auto')
    .option('--drain-deadline-s <n>', 'on SIGTERM, seconds to let running requests finish', String(DEFAULT_SERVER_OPTIONS.drainDeadlineMs / 1000))
    .option('--max-upload-mb <n>', 'largest adapter upload in MiB', String(DEFAULT_SERVER_OPTIONS.maxUploadBytes / 1024 / 1024))
    .action(async (options: ServeOptions) => {
      const log = (line: string): void => void process.stderr.write(`soppu serve: ${line}\n`);
      let modelDir = options.model;
      let bankDir = options.bank;
      const cacheDir = options.cache ?? process.env.SOPPU_CACHE ?? path.join(homedir(), '.cache', 'soppu', 'demo');
      const demo = modelDir === undefined;
      if (demo) {
        if (bankDir !== undefined) throw new SoppuError('CONFIG', '--bank needs --model (the demo builds its own bank)', { field: 'bank' });
        ({ modelDir, bankDir } = await ensureDemo(cacheDir, log));
      }
      const model = await loadLlamaModel(modelDir as string);
      const modelLimit = model.config.maxPositionEmbeddings;
      const maxTotalTokens = options.maxTotalTokens ? integer(options.maxTotalTokens, 'max-total-tokens', 2) : Math.min(4096, modelLimit);
      const maxInputTokens = options.maxInputTokens ? integer(options.maxInputTokens, 'max-input-tokens', 1) : Math.min(4095, maxTotalTokens - 1);
      if (maxInputTokens >= maxTotalTokens) {
        throw new SoppuError('CONFIG', `--max-input-tokens (${maxInputTokens}) must be below --max-total-tokens (${maxTotalTokens})`, { field: 'max-input-tokens', limit: maxTotalTokens });
      }
      const accessControl = options.auth ? AccessControl.fromFile(options.auth) : null;
      const host = options.host ?? '127.0.0.1';
      const port = integer(options.port, 'port', 0);
      const engine = await createEngine({
        modelDir: modelDir as string,
        model,
        modelId: demo ? 'soppu/demo-tiny' : path.basename(path.resolve(modelDir as string)),
        ...(bankDir ? { bankDir } : {}),
        kvBudgetBytes: integer(options.kvMemoryMb, 'kv-memory-mb', 1) * 1024 * 1024,
        adapterBudgetBytes: integer(options.adapterMemoryMb, 'adapter-memory-mb', 0) * 1024 * 1024,
        maxBatchTokens: integer(options.maxBatchTokens, 'max-batch-tokens', 1),
        maxRunningRequests: integer(options.maxRunningRequests, 'max-running-requests', 1),
        maxInputTokens,
        maxTotalTokens,
        blockSize: integer(options.blockSize, 'block-size', 1),
        loraDtype: parseLoraDtype(options.loraDtype),
      });
      const adapterDirs = (options.adapters ?? []).map((dir) => path.resolve(dir));
      const server = createServer(engine, {
        ...DEFAULT_SERVER_OPTIONS,
        maxConcurrentRequests: integer(options.maxConcurrentRequests, 'max-concurrent-requests', 1),
        maxStopSequences: integer(options.maxStopSequences, 'max-stop-sequences', 0),
        maxInputTokens,
        maxTotalTokens,
        maxUploadBytes: integer(options.maxUploadMb, 'max-upload-mb', 1) * 1024 * 1024,
        drainDeadlineMs: integer(options.drainDeadlineS, 'drain-deadline-s', 0) * 1000,
        adapterDirs,
        uploadDir: path.join(cacheDir, '..', 'uploads'),
        accessControl,
      });
      await server.app.listen({ port, host });
      const address = server.app.server.address();
      const boundPort = address !== null && typeof address === 'object' ? address.port : port;
      if (!accessControl) log(`no --auth keys file: every caller is an admin; bound to ${host} only${host === '127.0.0.1' || host === 'localhost' ? '' : ' (WARNING: not loopback)'}`);
      const adapters = engine.listAdapters();
      log(`model ${engine.info.modelId}, ${adapters.length} adapters, kernel ${engine.info.kernel}`);
      const example = adapters[0]?.id;
      process.stdout.write(`listening on http://${host}:${boundPort}\n`);
      process.stdout.write(
        `try: curl -s http://${host}:${boundPort}/generate -H 'content-type: application/json'${accessControl ? " -H 'authorization: Bearer <key>'" : ''} -d '{"inputs": "Hello", "parameters": {${example ? `"adapter_id": "${example}", ` : ''}"max_new_tokens": 16}}'\n`,
      );
      await new Promise<void>((resolve) => {
        const stop = (signal: string): void => {
          log(`${signal}: draining (deadline ${server.context.options.drainDeadlineMs / 1000} s)`);
          server
            .drain()
            .then(() => engine.close())
            .then(() => {
              log('drained; exiting');
              resolve();
            }, (e: unknown) => {
              log(`drain failed: ${e instanceof Error ? e.message : String(e)}`);
              process.exitCode = 1;
              resolve();
            });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
    });
}
