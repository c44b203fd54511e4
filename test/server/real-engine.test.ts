/**
 * End to end over a real socket with the real engine and a tiny seeded model: 64 concurrent
 * streaming requests over 64 compressed adapters give the same tokens as each request run alone
 * (greedy); a corrupt adapter fails only its own requests; a client disconnect frees KV blocks.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine, type EngineOptions } from '../../src/engine/engine.js';
import type { Engine } from '../../src/engine/engine-types.js';
import type { SoppuServer } from '../../src/server/create-server.js';
import { charTokenizer, handBank, tinyModel } from '../engine/helpers.js';
import { sseEvents, testServer } from './helpers.js';

const model = tinyModel(3);
const bank = handBank(model.config, { clusters: 4, perCluster: 16, rank: 3, seed: 9, corrupt: ['c3-15'] });

function engineOptions(): EngineOptions {
  return {
    model,
    tokenizer: charTokenizer(),
    bank: bank.reader,
    kvBudgetBytes: 256 * 4096,
    adapterBudgetBytes: 1 << 26,
    maxBatchTokens: 512,
    maxRunningRequests: 64,
    maxInputTokens: 64,
    maxTotalTokens: 128,
    blockSize: 8,
    seed: 1,
  };
}

const ADAPTERS = Array.from({ length: 64 }, (_, i) => `c${i >> 4}-${i & 15}`).filter((id) => id !== 'c3-15');
const PROMPTS = ['hello world', 'the quick brown fox', 'many adapters', 'one per user'];

let engine: Engine;
let server: SoppuServer;
let base: string;

beforeAll(async () => {
  engine = await createEngine(engineOptions());
  server = testServer(engine);
  await server.app.listen({ port: 0, host: '127.0.0.1' });
  const address = server.app.server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  base = `http://127.0.0.1:${address.port}`;
});
afterAll(async () => {
  await server.app.close();
  await engine.close();
});

async function stream(adapterId: string, prompt: string, maxNewTokens: number): Promise<{ status: number; text: string; ids: number[]; body: string }> {
  const response = await fetch(`${base}/generate_stream`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ inputs: prompt, parameters: { adapter_id: adapterId, max_new_tokens: maxNewTokens, ignore_eos_token: true } }),
  });
  const body = await response.text();
  if (response.status !== 200) return { status: response.status, text: '', ids: [], body };
  const events = sseEvents(body) as { token: { id: number }; generated_text: string | null }[];
  return { status: 200, text: events.at(-1)?.generated_text ?? '', ids: events.map((e) => e.token.id), body };
}

describe('server over the real engine', () => {
  it('64 concurrent streams (63 adapters + 1 corrupt) equal their solo runs; the corrupt one gets 424 naming it', async () => {
    const solo = await createEngine(engineOptions());
    const expected: { text: string; ids: number[] }[] = [];
    for (let i = 0; i < ADAPTERS.length; i++) {
      const run = { text: '', ids: [] as number[] };
      for await (const event of solo.generate({ prompt: PROMPTS[i % 4]!, adapterId: ADAPTERS[i]!, maxNewTokens: 6 + (i % 5), ignoreEos: true })) {
        if (event.type === 'done') run.text = event.generatedText;
        else run.ids.push(event.token.id);
      }
      expected.push(run);
    }
    await solo.close();
    const results = await Promise.all([
      ...ADAPTERS.map((id, i) => stream(id, PROMPTS[i % 4]!, 6 + (i % 5))),
      stream('c3-15', 'hello', 4),
    ]);
    for (let i = 0; i < ADAPTERS.length; i++) {
      expect(results[i]!.status, ADAPTERS[i]).toBe(200);
      expect(results[i]!.ids, ADAPTERS[i]).toEqual(expected[i]!.ids);
      expect(results[i]!.text, ADAPTERS[i]).toBe(expected[i]!.text);
    }
    const corrupt = results.at(-1)!;
    expect(corrupt.status).toBe(424);
    expect(JSON.parse(corrupt.body)).toMatchObject({ error_type: 'generation' });
    expect(JSON.parse(corrupt.body).error).toContain('c3-15');
  });

  it('a client disconnect cancels the generation and frees its KV blocks', async () => {
    const controller = new AbortController();
    const response = await fetch(`${base}/generate_stream`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: 'a long one', parameters: { adapter_id: 'c0-1', max_new_tokens: 100, ignore_eos_token: true } }),
      signal: controller.signal,
    });
    const reader = response.body!.getReader();
    await reader.read();
    expect(engine.stats().kvBlocksUsed).toBeGreaterThan(0);
    controller.abort();
    const deadline = Date.now() + 10_000;
    while ((engine.stats().kvBlocksUsed > 0 || engine.stats().running > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(engine.stats().kvBlocksUsed).toBe(0);
    expect(engine.stats().running).toBe(0);
  });
});

describe('adapter upload and hot reload over the real engine', () => {
  it('a tar.gz upload is served raw; re-uploading under the same id serves the new weights to the next request', async () => {
    const { execFileSync } = await import('node:child_process');
    const { mkdtempSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const path = await import('node:path');
    const { readFileSync, readdirSync } = await import('node:fs');
    const { saveLoraAdapter } = await import('../../src/io/save-lora-adapter.js');
    const { randomLora } = await import('../engine/helpers.js');
    const root = mkdtempSync(path.join(tmpdir(), 'soppu-upload-'));
    const soloText = async (dir: string): Promise<string> => {
      const solo = await createEngine(engineOptions());
      let text = '';
      for await (const event of solo.generate({ prompt: 'hello world', adapterId: 'x', adapterSource: 'local', adapterPath: dir, maxNewTokens: 8, ignoreEos: true })) {
        if (event.type === 'done') text = event.generatedText;
      }
      await solo.close();
      return text;
    };
    const served = async (): Promise<string> => {
      const response = await fetch(`${base}/generate`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ inputs: 'hello world', parameters: { adapter_id: 'uploaded-1', max_new_tokens: 8, ignore_eos_token: true } }),
      });
      expect(response.status).toBe(200);
      return ((await response.json()) as { generated_text: string }).generated_text;
    };
    const texts: string[] = [];
    for (const seed of [41, 42]) {
      const dir = path.join(root, `v${seed}`);
      await saveLoraAdapter(dir, randomLora(model.config, seed, 4, 8, 0.5));
      const archive = path.join(root, `v${seed}.tar.gz`);
      execFileSync('tar', ['czf', archive, '-C', root, `v${seed}`]);
      const upload = await fetch(`${base}/adapters?id=uploaded-1&compress=false`, { method: 'POST', headers: { 'content-type': 'application/gzip' }, body: readFileSync(archive) });
      expect(upload.status, await upload.clone().text()).toBe(201);
      expect(await upload.json()).toMatchObject({ id: 'uploaded-1', storage: 'raw' });
      const text = await served();
      expect(text).toBe(await soloText(dir));
      texts.push(text);
      // the replaced upload's folder is gone (no request held it), the current one stays
      expect(readdirSync(server.context.options.uploadDir)).toHaveLength(1);
    }
    expect(texts[0]).not.toBe(texts[1]);
    const removed = await fetch(`${base}/adapters/uploaded-1`, { method: 'DELETE' });
    expect(removed.status).toBe(204);
    expect(readdirSync(server.context.options.uploadDir)).toEqual([]);
    // an upload whose adapter files are wrong is the caller's to fix: 422, naming the file in the archive only
    const broken = path.join(root, 'broken');
    await saveLoraAdapter(broken, randomLora(model.config, 43, 4, 8, 0.5));
    const { writeFileSync } = await import('node:fs');
    writeFileSync(path.join(broken, 'adapter_config.json'), '{"peft_type": "LORA", "r": "eight"}');
    execFileSync('tar', ['czf', path.join(root, 'broken.tar.gz'), '-C', root, 'broken']);
    const refused = await fetch(`${base}/adapters?id=broken-1&compress=false`, { method: 'POST', headers: { 'content-type': 'application/gzip' }, body: readFileSync(path.join(root, 'broken.tar.gz')) });
    expect(refused.status).toBe(422);
    const error = ((await refused.json()) as { error: string }).error;
    expect(error).toMatch(/^Input validation error: upload for 'broken-1': /);
    expect(error).not.toContain(server.context.options.uploadDir);
    expect(readdirSync(server.context.options.uploadDir)).toEqual([]);
  });

  it('metrics: validation, queue and inference add up to the request duration; the batch size reads 0 when idle', async () => {
    const response = await fetch(`${base}/generate`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: 'hello world', parameters: { adapter_id: ADAPTERS[0], max_new_tokens: 6, ignore_eos_token: true } }),
    });
    expect(response.status).toBe(200);
    await new Promise((resolve) => setTimeout(resolve, 20)); // the engine loop notices it is idle
    const metrics = (await (await fetch(`${base}/metrics?format=json`)).json()) as { name: string; values: { value: number; metricName?: string }[] }[];
    const sumOf = (name: string): number => metrics.find((m) => m.name === name)!.values.find((v) => v.metricName === `${name}_sum`)!.value;
    const parts = sumOf('lorax_request_validation_duration') + sumOf('lorax_request_queue_duration') + sumOf('lorax_request_inference_duration');
    expect(parts).toBeCloseTo(sumOf('lorax_request_duration'), 2);
    expect(metrics.find((m) => m.name === 'lorax_batch_current_size')!.values[0]!.value).toBe(0);
  });

  it('metrics and headers time the queue as LoRAX does: the wait before the first step, then inference per generated token', async () => {
    const scrape = async () => (await (await fetch(`${base}/metrics`)).text());
    const count = (text: string): number => Number(/^lorax_request_mean_time_per_token_duration_count (\S+)$/m.exec(text)?.[1] ?? NaN);
    const before = count(await scrape());
    const response = await fetch(`${base}/generate`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: 'hello world', parameters: { max_new_tokens: 1 } }),
    });
    expect(response.status).toBe(200);
    const header = (name: string): number => Number(response.headers.get(name));
    // one token: its time is the inference (prefill) time, observed as LoRAX's time per token
    expect(count(await scrape())).toBe(before + 1);
    expect(header('x-time-per-token')).toBe(header('x-inference-time'));
    expect(header('x-queue-time') + header('x-inference-time') + header('x-validation-time')).toBeLessThanOrEqual(header('x-total-time') + 3);
  });

  it("metrics: LoRAX's batch metrics follow the engine's steps (prefill and decode), and a request's input count", async () => {
    const scrape = async () => (await (await fetch(`${base}/metrics`)).text());
    const value = (text: string, line: string): number => Number(new RegExp(`^${line.replace(/[{}"]/g, (c) => `\\${c}`)} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
    const before = await scrape();
    const response = await fetch(`${base}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: '', prompt: ['hello world', 'abc'], n: 2, max_tokens: 5 }),
    });
    expect(response.status).toBe(200);
    await new Promise((resolve) => setTimeout(resolve, 20));
    const after = await scrape();
    const delta = (line: string): number => value(after, line) - value(before, line);
    const prefill = delta('lorax_batch_inference_count{method="prefill"}');
    const decode = delta('lorax_batch_inference_count{method="decode"}');
    expect(prefill).toBeGreaterThanOrEqual(1);
    expect(decode).toBeGreaterThanOrEqual(3); // 5 tokens: the first from a prefill step, at least 3 more from decode-only steps
    expect(delta('lorax_batch_inference_success{method="prefill"}')).toBe(prefill);
    expect(delta('lorax_batch_inference_success{method="decode"}')).toBe(decode);
    expect(delta('lorax_batch_inference_failure{method="decode"}')).toBe(0);
    expect(delta('lorax_batch_inference_duration_count{method="decode"}')).toBe(decode);
    expect(delta('lorax_batch_next_size_sum')).toBe(4); // four choices joined
    expect(value(after, 'lorax_batch_current_max_tokens')).toBe(0); // idle
    expect(delta('lorax_request_input_count_sum')).toBe(4);
    expect(delta('lorax_request_skipped_tokens_count')).toBe(1);
  });
});
