/**
 * `soppu serve`: the HTTP server (LoRAX + OpenAI APIs) over the engine. With no --model it builds a
 * demo once into its own subfolder `soppu-demo-v1` of the cache folder (--cache, $SOPPU_CACHE or
 * ~/.cache/soppu/demo): a tiny model, 100 generated user adapters compressed into a bank. Only that
 * subfolder is ever deleted (to redo an unfinished build); nothing else in the cache folder is
 * touched. SIGTERM/SIGINT drain: stop accepting, finish running requests within the deadline, exit 0.
 */
import { lstatSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import path from 'node:path';
import type { Command } from 'commander';
import { compressDirectoriesToBank } from '../../compress/bank-compress.js';
import { createEngine, parseLoraDtype } from '../../engine/engine.js';
import { kvBlocksForBudget, kvBytesPerBlock } from '../../engine/kv-block-pool.js';
import { SoppuError } from '../../errors/soppu-error.js';
import { BASE_SHAPES } from '../../io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../io/fixtures/generate-adapters.js';
import { generateModel } from '../../io/fixtures/generate-model.js';
import { loadLlamaModel } from '../../model/llama-model.js';
import { AccessControl } from '../../server/access-control.js';
import { createServer } from '../../server/create-server.js';
import { DEFAULT_SERVER_OPTIONS } from '../../server/server-options.js';
import { parseInteger } from '../parse-integer.js';
import { watchBank } from '../watch-bank.js';

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
  bankWatchS: string;
  maxUploadMb: string;
}

/** The most MiB a memory budget flag takes (4 TiB): beyond it is a typo, not a machine. */
const MAX_MEMORY_MB = 4 * 1024 * 1024;

/** Port numbers `--port` accepts (0 lets the OS pick a free one). */
const MAX_PORT = 65535;

function portNumber(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n > MAX_PORT) {
    throw new SoppuError('CONFIG', `--port must be an integer from 0 to ${MAX_PORT} (0 picks a free port), got "${value}"`, { field: 'port', limit: MAX_PORT });
  }
  return n;
}

/**
 * The one-line CONFIG error for a failed `listen` (port taken, no permission, unknown or foreign
 * host), or null when `e` is not such a failure.
 */
export function listenFailure(e: unknown, host: string, port: number): SoppuError | null {
  const error = e as (NodeJS.ErrnoException & { hostname?: string }) | null;
  const code = typeof error?.code === 'string' ? error.code : undefined;
  if (code === undefined) return null;
  const make = (message: string, field: 'port' | 'host'): SoppuError => new SoppuError('CONFIG', message, { field, code }, { cause: e });
  switch (code) {
    case 'EADDRINUSE':
      return make(`port ${port} on ${host} is already in use (--port)`, 'port');
    case 'EACCES':
    case 'EPERM':
      return make(`no permission to listen on port ${port} on ${host}; ports below 1024 usually need privileges (--port)`, 'port');
    case 'ERR_SOCKET_BAD_PORT':
      return make(`port ${port} is not a valid port: use 0 to ${MAX_PORT} (--port)`, 'port');
    case 'EADDRNOTAVAIL':
      return make(`address ${host} does not belong to this machine, so the server cannot listen on it (--host)`, 'host');
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
    case 'EAI_FAIL':
    case 'EAI_NONAME':
    case 'EAI_NODATA':
      return make(`host ${host} cannot be resolved to an address (--host)`, 'host');
    case 'EAFNOSUPPORT':
    case 'EINVAL':
      return make(`cannot listen on ${host} port ${port}: ${code} (--host, --port)`, 'host');
    default:
      return error?.syscall === 'listen' || error?.syscall === 'bind' || error?.syscall === 'getaddrinfo'
        ? make(`cannot listen on ${host} port ${port}: ${code} (--host, --port)`, 'host')
        : null;
  }
}

/** The demo's folder inside the cache folder: the only path `soppu serve` creates there or deletes. */
export const DEMO_DIR_NAME = 'soppu-demo-v1';
/** Written first into a demo folder soppu creates; a folder without it is never deleted. */
const DEMO_OWNER_MARKER = '.soppu-demo';
/** Written last, when the demo is complete. */
const DEMO_READY_MARKER = 'READY';

/**
 * Readies `<cacheDir>/soppu-demo-v1` for the demo. A finished demo there (both markers) →
 * `ready: true`. Otherwise a folder left by an unfinished build (it holds the owner marker) is
 * removed, the folder is (re)created with the owner marker, and `ready: false`. Nothing else in
 * `cacheDir` is read, changed or deleted; a non-empty `soppu-demo-v1` that soppu did not create
 * (no owner marker), or one that is a link or a file, is a CONFIG error and stays as it is.
 */
export function prepareDemoDir(cacheDir: string): { demoDir: string; ready: boolean } {
  const demoDir = path.join(path.resolve(cacheDir), DEMO_DIR_NAME);
  const owner = path.join(demoDir, DEMO_OWNER_MARKER);
  let stat: ReturnType<typeof lstatSync> | undefined;
  try {
    stat = lstatSync(demoDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new SoppuError('FILE_IO', `demo folder ${demoDir} cannot be read: ${(e as Error).message}`, { file: demoDir }, { cause: e });
  }
  const notOurs = (why: string): SoppuError =>
    new SoppuError('CONFIG', `${demoDir} ${why}, so soppu will not build the demo there or delete it; remove it yourself or choose another --cache / $SOPPU_CACHE`, { file: demoDir, field: 'cache' });
  if (stat !== undefined) {
    if (!stat.isDirectory()) throw notOurs(stat.isSymbolicLink() ? 'is a symbolic link' : 'is not a folder');
    const entries = readdirSync(demoDir);
    if (entries.length > 0 && !entries.includes(DEMO_OWNER_MARKER)) throw notOurs('exists but was not created by soppu serve');
    if (entries.includes(DEMO_READY_MARKER) && entries.includes(DEMO_OWNER_MARKER)) return { demoDir, ready: true };
    if (entries.length > 0) rmSync(demoDir, { recursive: true, force: true });
  }
  try {
    mkdirSync(demoDir, { recursive: true });
    writeFileSync(owner, 'created by `soppu serve` for its demo; soppu may delete and rebuild this folder\n');
  } catch (e) {
    throw new SoppuError('FILE_IO', `cannot create the demo folder ${demoDir}: ${(e as Error).message}`, { file: demoDir, field: 'cache' }, { cause: e });
  }
  return { demoDir, ready: false };
}

/** Builds (once) the demo model and a bank of 100 compressed user adapters under `<cacheDir>/soppu-demo-v1`. */
export async function ensureDemo(cacheDir: string, log: (line: string) => void): Promise<{ modelDir: string; bankDir: string }> {
  const { demoDir, ready } = prepareDemoDir(cacheDir);
  const modelDir = path.join(demoDir, 'model');
  const bankDir = path.join(demoDir, 'bank');
  if (ready) return { modelDir, bankDir };
  log(`building the demo (tiny model + 100 compressed user adapters) in ${demoDir} …`);
  await generateModel({ out: modelDir, shape: 'tiny', seed: 1 });
  const adaptersDir = path.join(demoDir, 'adapters');
  const adapterDirs = await writeGeneratedAdapters(adaptersDir, 100, { base: BASE_SHAPES.tiny, rank: 8, sharedRank: 4, seed: 2 });
  await compressDirectoriesToBank(
    adapterDirs.map((dir) => `${path.basename(dir)}=${dir}`),
    bankDir,
    { compress: { method: 'jd-diag', maxError: 0.2, seed: 0 } },
  );
  rmSync(adaptersDir, { recursive: true, force: true });
  writeFileSync(path.join(demoDir, DEMO_READY_MARKER), new Date().toISOString());
  return { modelDir, bankDir };
}

export function register(program: Command): void {
  program
    .command('serve')
    .description('serve the model and its adapters over LoRAX- and OpenAI-compatible HTTP APIs')
    .option('--model <dir>', 'model directory (default: build and serve the demo)')
    .option('--bank <dir>', 'compressed adapter bank directory')
    .option('--bank-watch-s <n>', 'read the bank again when its manifest.json changes on disk (soppu bank add/rm/refit), checked every n seconds; 0: only on POST /bank/reload or SIGHUP', '2')
    .option('--adapters <dir...>', 'directories that adapter_source=local paths and admin registrations must lie inside')
    .option('--auth <keys.json>', 'API keys file: {"<key>": {"role": "admin"|"user", "adapters": [ids or globs]}}')
    .option('--port <n>', 'port', '8080')
    .option('--host <addr>', 'address to bind (default 127.0.0.1; without --auth only loopback is safe)')
    .option('--cache <dir>', `cache folder; the demo is built in its subfolder ${DEMO_DIR_NAME} and uploaded adapters are unpacked in uploads/ (default $SOPPU_CACHE or ~/.cache/soppu/demo)`)
    .option('--max-concurrent-requests <n>', 'requests in flight before 429', String(DEFAULT_SERVER_OPTIONS.maxConcurrentRequests))
    .option('--max-running-requests <n>', 'requests decoded together in one batch', '64')
    .option('--max-batch-tokens <n>', 'tokens per forward step', '2048')
    .option('--max-input-tokens <n>', 'prompt tokens allowed (default: --max-total-tokens − 1, at most 4095)')
    .option('--max-total-tokens <n>', 'prompt + generated tokens allowed (default: the smallest of 4096, the model\'s positions and what --kv-memory-mb holds)')
    .option('--max-stop-sequences <n>', 'stop sequences per request', String(DEFAULT_SERVER_OPTIONS.maxStopSequences))
    .option('--kv-memory-mb <n>', 'KV-cache budget in MiB', '512')
    .option('--adapter-memory-mb <n>', 'resident adapter budget in MiB', '512')
    .option('--block-size <n>', 'KV-cache block size in positions', '16')
    .option('--lora-dtype <dtype>', 'adapter factors and cores in memory: auto (the model dtype; a bank\'s adapters in bf16 for an f32 model), f32, bf16 or f16', 'auto')
    .option('--drain-deadline-s <n>', 'on SIGTERM or SIGINT, seconds to let running requests finish', String(DEFAULT_SERVER_OPTIONS.drainDeadlineMs / 1000))
    .option('--max-upload-mb <n>', 'largest adapter upload in MiB', String(DEFAULT_SERVER_OPTIONS.maxUploadBytes / 1024 / 1024))
    .action(async (options: ServeOptions) => {
      const log = (line: string): void => void process.stderr.write(`soppu serve: ${line}\n`);
      let modelDir = options.model;
      let bankDir = options.bank;
      const cacheDir = options.cache ?? process.env.SOPPU_CACHE ?? path.join(homedir(), '.cache', 'soppu', 'demo');
      const demo = modelDir === undefined;
      // Options that need no model are checked before the (possibly slow) demo build and model load.
      const host = options.host ?? '127.0.0.1';
      const port = portNumber(options.port);
      const accessControl = options.auth ? AccessControl.fromFile(options.auth) : null;
      for (const warning of accessControl?.warnings ?? []) log(`WARNING: ${warning}`);
      // SIGHUP reads the keys file again, as POST /keys/reload does, and the bank, as POST /bank/reload does (from
      // here on: it no longer ends the process)
      let reloadBank: (() => Promise<{ adapters: number }>) | null = null;
      process.on('SIGHUP', () => {
        reloadKeys(accessControl).forEach(log);
        if (reloadBank) {
          reloadBank().then(
            ({ adapters }) => log(`SIGHUP: bank reloaded: ${adapters} adapter${adapters === 1 ? '' : 's'}`),
            (e: unknown) => log(`SIGHUP: bank reload failed, the bank read before stays: ${e instanceof Error ? e.message : String(e)}`),
          );
        }
      });
      const adapterDirs = (options.adapters ?? []).map((dir) => path.resolve(dir));
      for (const dir of adapterDirs) {
        if (!statSync(dir, { throwIfNoEntry: false })?.isDirectory()) throw new SoppuError('CONFIG', `--adapters ${dir}: not a folder`, { field: 'adapters', file: dir });
      }
      if (demo) {
        if (bankDir !== undefined) throw new SoppuError('CONFIG', '--bank needs --model (the demo builds its own bank)', { field: 'bank' });
        ({ modelDir, bankDir } = await ensureDemo(cacheDir, log));
      }
      const model = await loadLlamaModel(modelDir as string);
      const modelLimit = model.config.maxPositionEmbeddings;
      const kvMemoryMb = parseInteger(options.kvMemoryMb, 'kv-memory-mb', 1, MAX_MEMORY_MB);
      const blockSize = parseInteger(options.blockSize, 'block-size', 1);
      const kvShape = { layers: model.config.numLayers, kvHeads: model.config.numKvHeads, headDim: model.config.headDim, blockSize };
      const kvTokens = kvBlocksForBudget(kvShape, kvMemoryMb * 1024 * 1024) * blockSize;
      if (kvTokens < 2) {
        throw new SoppuError('CONFIG', `--kv-memory-mb ${kvMemoryMb} holds ${kvTokens} tokens of this model (${kvBytesPerBlock(kvShape)} bytes per block of ${blockSize}); it needs room for at least 2`, { field: 'kv-memory-mb' });
      }
      // one request must fit in the KV cache: the default is what it holds when that is below 4096
      const maxTotalTokens = options.maxTotalTokens ? parseInteger(options.maxTotalTokens, 'max-total-tokens', 2) : Math.min(4096, modelLimit, kvTokens);
      if (maxTotalTokens > modelLimit) {
        throw new SoppuError('CONFIG', `--max-total-tokens (${maxTotalTokens}) is more than the model's context: ${modelLimit} tokens (config.json max_position_embeddings, or a Mistral/Qwen2 sliding window)`, { field: 'max-total-tokens', limit: modelLimit });
      }
      if (maxTotalTokens > kvTokens) {
        throw new SoppuError(
          'CONFIG',
          `--max-total-tokens (${maxTotalTokens}) is more than the KV cache holds: --kv-memory-mb ${kvMemoryMb} holds ${kvTokens} tokens of this model (${kvBytesPerBlock(kvShape) / blockSize} bytes each); raise --kv-memory-mb or lower --max-total-tokens`,
          { field: 'max-total-tokens', limit: kvTokens },
        );
      }
      if (!options.maxTotalTokens && kvTokens < Math.min(4096, modelLimit)) log(`max total tokens per request: ${maxTotalTokens}, what --kv-memory-mb ${kvMemoryMb} holds`);
      const maxInputTokens = options.maxInputTokens ? parseInteger(options.maxInputTokens, 'max-input-tokens', 1) : Math.min(4095, maxTotalTokens - 1);
      if (maxInputTokens >= maxTotalTokens) {
        throw new SoppuError('CONFIG', `--max-input-tokens (${maxInputTokens}) must be below --max-total-tokens (${maxTotalTokens})`, { field: 'max-input-tokens', limit: maxTotalTokens });
      }
      const serverLimits = {
        maxConcurrentRequests: parseInteger(options.maxConcurrentRequests, 'max-concurrent-requests', 1),
        maxStopSequences: parseInteger(options.maxStopSequences, 'max-stop-sequences', 0),
        maxUploadBytes: parseInteger(options.maxUploadMb, 'max-upload-mb', 1) * 1024 * 1024,
        // a Node timer holds at most 2^31 − 1 ms (a longer one fires at once)
        drainDeadlineMs: parseInteger(options.drainDeadlineS, 'drain-deadline-s', 0, Math.floor((2 ** 31 - 1) / 1000)) * 1000,
      };
      const bankWatchMs = parseInteger(options.bankWatchS, 'bank-watch-s', 0, 86400) * 1000;
      const engine = await createEngine({
        modelDir: modelDir as string,
        model,
        modelId: demo ? 'soppu/demo-tiny' : path.basename(path.resolve(modelDir as string)),
        ...(bankDir ? { bankDir } : {}),
        kvBudgetBytes: kvMemoryMb * 1024 * 1024,
        adapterBudgetBytes: parseInteger(options.adapterMemoryMb, 'adapter-memory-mb', 0, MAX_MEMORY_MB) * 1024 * 1024,
        maxBatchTokens: parseInteger(options.maxBatchTokens, 'max-batch-tokens', 1),
        maxRunningRequests: parseInteger(options.maxRunningRequests, 'max-running-requests', 1),
        maxInputTokens,
        maxTotalTokens,
        blockSize,
        loraDtype: parseLoraDtype(options.loraDtype),
      });
      if (bankDir && engine.reloadBank) reloadBank = engine.reloadBank.bind(engine);
      const stopWatching = bankDir && reloadBank && bankWatchMs > 0 ? watchBank(bankDir, bankWatchMs, reloadBank, log) : () => undefined;
      const server = createServer(engine, {
        ...DEFAULT_SERVER_OPTIONS,
        ...serverLimits,
        maxInputTokens,
        maxTotalTokens,
        adapterDirs,
        uploadDir: path.join(cacheDir, 'uploads'), // inside the folder the user named (its parent is not ours)
        accessControl,
      });
      try {
        await server.app.listen({ port, host });
      } catch (e) {
        const failure = listenFailure(e, host, port);
        await server.app.close().catch(() => undefined);
        await engine.close().catch(() => undefined);
        stopWatching();
        throw failure ?? e;
      }
      const address = server.app.server.address();
      const boundPort = address !== null && typeof address === 'object' ? address.port : port;
      if (!accessControl) log(`no --auth keys file: every caller is an admin; bound to ${host} only${host === '127.0.0.1' || host === 'localhost' ? '' : ' (WARNING: not loopback)'}`);
      const adapters = engine.listAdapters();
      log(`model ${engine.info.modelId} (${engine.info.modelDtype}), ${adapters.length} adapters (PEFT folders held in ${engine.info.loraDtype}, a bank's in ${engine.info.bankDtype}), kernel ${engine.info.kernel}`);
      const example = adapters[0]?.id;
      process.stdout.write(`listening on http://${host}:${boundPort}\n`);
      process.stdout.write(
        `try: curl -s http://${host}:${boundPort}/generate -H 'content-type: application/json'${accessControl ? " -H 'authorization: Bearer <key>'" : ''} -d '{"inputs": "Hello", "parameters": {${example ? `"adapter_id": "${example}", ` : ''}"max_new_tokens": 16}}'\n`,
      );
      await new Promise<void>((resolve) => {
        const stop = (signal: string): void => {
          log(`${signal}: draining (deadline ${server.context.options.drainDeadlineMs / 1000} s)`);
          stopWatching();
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

/** What SIGHUP did, as log lines: the keys file read again (and its warnings), or why the keys loaded before stay. */
function reloadKeys(accessControl: AccessControl | null): string[] {
  if (!accessControl?.file) return ['SIGHUP: no --auth keys file to reload'];
  try {
    const { keys, warnings } = accessControl.reload();
    return [`SIGHUP: keys reloaded from ${accessControl.file}: ${keys} key${keys === 1 ? '' : 's'}`, ...warnings.map((w) => `WARNING: ${w}`)];
  } catch (e) {
    return [`SIGHUP: keys reload failed, the ${accessControl.size} keys loaded before stay: ${e instanceof Error ? e.message : String(e)}`];
  }
}
