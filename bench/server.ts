/**
 * Server benchmark: a small fetch load generator against the HTTP server on loopback, over a
 * SmolLM-135M-shaped model (generated bf16 weights) and an in-memory bank of --bank-size compressed
 * user adapters (the compressor's shapes: shared U, Vᵀ per cluster and slot, a full core per adapter).
 * For 1, 16 and 64 concurrent streaming clients it reports requests/s, tokens/s, p50/p95 time to
 * first token and p50/p95 time per output token, base (the peer: same server, no adapter) vs every
 * request a distinct compressed adapter. Then it runs twice the admitted concurrency three times and
 * reports the failures other than 429 (there should be none) and the resident memory after each run
 * (read it for growth between runs; the bench does not fail on it).
 *
 *   npm run bench -- server [--clients 1,16,64] [--requests-per-client 2] [--max-new-tokens 16]
 *                           [--layers N] [--bank-size 1000] [--clusters 4] [--shared-rank 16]
 *                           [--targets q_proj,k_proj,v_proj,o_proj] [--admitted 32] [--no-write]
 *
 * The load generator runs in the server's process (one event loop), so its own cost is included.
 */
import { existsSync } from 'node:fs';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createEngine } from '../src/engine/engine.js';
import { generateModel } from '../src/io/fixtures/generate-model.js';
import { TARGET_MODULES, type TargetModule } from '../src/model/adapter-hook.js';
import { loadLlamaModel } from '../src/model/llama-model.js';
import { createServer } from '../src/server/create-server.js';
import { DEFAULT_SERVER_OPTIONS } from '../src/server/server-options.js';
import { machineDescription, repositoryRoot, writeBenchmarkSection } from './helpers/benchmarks-md.js';
import { syntheticBank, syntheticBankId } from './helpers/synthetic-bank.js';
import { fmt } from './helpers/timing.js';

interface Args {
  clients: number[];
  requestsPerClient: number;
  maxNewTokens: number;
  layers: number | undefined;
  bankSize: number;
  clusters: number;
  sharedRank: number;
  targets: TargetModule[];
  admitted: number;
  write: boolean;
}

function parseArgs(argv: readonly string[]): Args {
  const value = (name: string): string | undefined => {
    const at = argv.indexOf(`--${name}`);
    return at >= 0 ? argv[at + 1] : undefined;
  };
  const list = (name: string, fallback: string): string[] => (value(name) ?? fallback).split(',').filter(Boolean);
  const targets = list('targets', 'q_proj,k_proj,v_proj,o_proj');
  for (const t of targets) if (!TARGET_MODULES.includes(t as TargetModule)) throw new Error(`--targets: unknown module ${t}`);
  return {
    clients: list('clients', '1,16,64').map(Number),
    requestsPerClient: Number(value('requests-per-client') ?? 2),
    maxNewTokens: Number(value('max-new-tokens') ?? 16),
    layers: value('layers') ? Number(value('layers')) : undefined,
    bankSize: Number(value('bank-size') ?? 1000),
    clusters: Number(value('clusters') ?? 4),
    sharedRank: Number(value('shared-rank') ?? 16),
    targets: targets as TargetModule[],
    admitted: Number(value('admitted') ?? 32),
    write: !argv.includes('--no-write'),
  };
}

interface RequestResult {
  status: number;
  ttftMs: number;
  perTokenMs: number;
  tokens: number;
}

async function streamOnce(base: string, adapterId: string | null, index: number, maxNewTokens: number): Promise<RequestResult> {
  const started = performance.now();
  const prompt = `user ${index} asks about request number ${index * 7} and the weather`;
  const response = await fetch(`${base}/generate_stream`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ inputs: prompt, parameters: { ...(adapterId ? { adapter_id: adapterId } : {}), max_new_tokens: maxNewTokens, ignore_eos_token: true } }),
  });
  if (response.status !== 200) {
    await response.text();
    return { status: response.status, ttftMs: 0, perTokenMs: 0, tokens: 0 };
  }
  const reader = response.body!.getReader();
  let first = 0;
  let tokens = 0;
  let buffered = '';
  const decoder = new TextDecoder();
  for (;;) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buffered += decoder.decode(chunk.value, { stream: true });
    const events = buffered.split('\n\n');
    buffered = events.pop() ?? '';
    for (const event of events) {
      if (!event.startsWith('data:')) continue;
      if (event.includes('"error_type"')) return { status: 500, ttftMs: 0, perTokenMs: 0, tokens };
      tokens += 1;
      if (tokens === 1) first = performance.now();
    }
  }
  const end = performance.now();
  return { status: 200, ttftMs: first - started, perTokenMs: tokens > 1 ? (end - first) / (tokens - 1) : 0, tokens };
}

function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

interface LoadResult {
  requestsPerSecond: number;
  tokensPerSecond: number;
  ttft50: number;
  ttft95: number;
  tpot50: number;
  tpot95: number;
  statuses: Map<number, number>;
}

async function load(base: string, clients: number, perClient: number, maxNewTokens: number, adapterOf: (request: number) => string | null): Promise<LoadResult> {
  const results: RequestResult[] = [];
  let next = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      for (let i = 0; i < perClient; i++) {
        const index = next++;
        results.push(await streamOnce(base, adapterOf(index), index, maxNewTokens));
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const ok = results.filter((r) => r.status === 200);
  const statuses = new Map<number, number>();
  for (const r of results) statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
  return {
    requestsPerSecond: ok.length / seconds,
    tokensPerSecond: ok.reduce((sum, r) => sum + r.tokens, 0) / seconds,
    ttft50: percentile(ok.map((r) => r.ttftMs), 50),
    ttft95: percentile(ok.map((r) => r.ttftMs), 95),
    tpot50: percentile(ok.map((r) => r.perTokenMs), 50),
    tpot95: percentile(ok.map((r) => r.perTokenMs), 95),
    statuses,
  };
}

export async function run(argv: string[]): Promise<void> {
  const args = parseArgs(argv);
  const root = repositoryRoot(dirname(fileURLToPath(import.meta.url)));
  const dir = join(root, 'bench', 'out', `smollm-135m-bf16${args.layers ? `-l${args.layers}` : ''}`);
  if (!existsSync(join(dir, 'config.json'))) {
    process.stderr.write(`generating ${dir}\n`);
    await generateModel({ out: dir, shape: 'smollm-135m', dtype: 'bf16', seed: 1, ...(args.layers ? { numLayers: args.layers } : {}) });
  }
  const model = await loadLlamaModel(dir);
  const maxClients = Math.max(...args.clients, args.admitted * 2);
  const engine = await createEngine({
    modelDir: dir,
    model,
    modelId: 'smollm-135m-shapes',
    bank: syntheticBank(model.config, { ...args, idPrefix: 'user-' }),
    kvBudgetBytes: 512 * 1024 * 1024,
    adapterBudgetBytes: 256 * 1024 * 1024,
    maxBatchTokens: 2048,
    maxRunningRequests: 64,
    maxInputTokens: 512,
    maxTotalTokens: 1024,
    blockSize: 16,
    seed: 1,
  });
  const makeServer = (maxConcurrentRequests: number) =>
    createServer(engine, {
      ...DEFAULT_SERVER_OPTIONS,
      maxConcurrentRequests,
      maxInputTokens: 512,
      maxTotalTokens: 1024,
      adapterDirs: [],
      uploadDir: mkdtempSync(join(tmpdir(), 'soppu-bench-uploads-')),
      accessControl: null,
    });
  const server = makeServer(maxClients);
  const base = await server.app.listen({ port: 0, host: '127.0.0.1' });
  await load(base, 1, 2, args.maxNewTokens, (i) => (i === 0 ? null : 'user-0999')); // warm-up, not measured
  const rows: string[] = [];
  let adapterCursor = 0;
  for (const clients of args.clients) {
    for (const mode of ['base', 'compressed'] as const) {
      const result = await load(base, clients, args.requestsPerClient, args.maxNewTokens, () => (mode === 'base' ? null : syntheticBankId('user-', adapterCursor++ % args.bankSize)));
      const failures = [...result.statuses].filter(([s]) => s !== 200).map(([s, n]) => `${n}×${s}`).join(' ') || '0';
      rows.push(`| ${clients} | ${mode} | ${fmt(result.requestsPerSecond)} | ${fmt(result.tokensPerSecond)} | ${fmt(result.ttft50)} | ${fmt(result.ttft95)} | ${fmt(result.tpot50)} | ${fmt(result.tpot95)} | ${failures} |`);
      process.stderr.write(`${rows.at(-1)}\n`);
    }
  }
  await server.app.close();
  // overload: twice the admitted concurrency, three runs; only 429s may fail, RSS must not grow
  const limited = makeServer(args.admitted);
  const limitedBase = await limited.app.listen({ port: 0, host: '127.0.0.1' });
  const overloadRows: string[] = [];
  for (let runIndex = 1; runIndex <= 3; runIndex++) {
    const result = await load(limitedBase, args.admitted * 2, args.requestsPerClient, args.maxNewTokens, (i) => syntheticBankId('user-', i % args.bankSize));
    (globalThis as { gc?: () => void }).gc?.();
    const rss = process.memoryUsage().rss / 1024 / 1024;
    const ok = result.statuses.get(200) ?? 0;
    const overloaded = result.statuses.get(429) ?? 0;
    const other = [...result.statuses].filter(([s]) => s !== 200 && s !== 429).reduce((sum, [, n]) => sum + n, 0);
    overloadRows.push(`| ${runIndex} | ${args.admitted * 2} | ${ok} | ${overloaded} | ${other} | ${fmt(rss, 4)} |`);
    process.stderr.write(`${overloadRows.at(-1)}\n`);
  }
  await limited.app.close();
  await engine.close();
  const markdown = [
    '## Server: HTTP load over 1,000 compressed user adapters',
    '',
    `Command: \`${`npm run bench -- server ${argv.join(' ')}`.trim()}\` — ${new Date().toISOString().slice(0, 10)}, ${machineDescription()}.`,
    `Model: SmolLM-135M shapes (generated bf16 weights${args.layers ? `, ${args.layers} layers` : ''}), kernel ${engine.info.kernel}. Bank: ${args.bankSize} compressed adapters in memory (${args.clusters} clusters, shared rank ${args.sharedRank}, full cores) on ${args.targets.join(', ')}. Each client streams ${args.requestsPerClient} requests of ${args.maxNewTokens} tokens over /generate_stream on loopback; in "compressed" every request names a different adapter. Peer: the same server with no adapter (base). Times in ms.`,
    '',
    '| clients | mode | req/s | tokens/s | TTFT p50 | TTFT p95 | per output token p50 | p95 | failures |',
    '|---|---|---|---|---|---|---|---|---|',
    ...rows,
    '',
    `Overload: max_concurrent_requests ${args.admitted}, ${args.admitted * 2} clients, 3 runs (RSS after each run):`,
    '',
    '| run | clients | 200 | 429 | other failures | RSS MiB |',
    '|---|---|---|---|---|---|',
    ...overloadRows,
  ].join('\n');
  process.stdout.write(`${markdown}\n`);
  if (args.write) process.stderr.write(`wrote ${writeBenchmarkSection(root, 'server', markdown)}\n`);
}
