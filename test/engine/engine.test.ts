import { describe, expect, it } from 'vitest';
import { createEngine, localAdapterKey, type EngineOptions } from '../../src/engine/engine.js';
import type { GenerateRequest } from '../../src/engine/engine-types.js';
import { residentFromLora } from '../../src/engine/resident-adapter.js';
import { slotShapeOf } from '../../src/engine/engine.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';
import type { LlamaModel } from '../../src/model/llama-model.js';
import { bf16ArrayToF32, f32ArrayToBf16 } from '../../src/tensor/dtype.js';
import { bf16Copy, charTokenizer, collect, handBank, memoryLoader, mergedModel, randomLora, tinyModel } from './helpers.js';

const model = tinyModel(11);
const tokenizer = charTokenizer();
const bank = handBank(model.config, { clusters: 2, perCluster: 9, rank: 3, seed: 5, corrupt: ['c0-8'] });
const rawAdapters = new Map<string, LoraAdapter>();
for (let i = 0; i < 16; i++) rawAdapters.set(`/adapters/raw-${i}`, randomLora(model.config, 100 + i, 4, 8));
rawAdapters.set('/adapters/export-c1-3', bank.exportRaw('c1-3'));
const corruptDirs = new Set(['/adapters/broken']);
const rawBytes = residentFromLora('x', rawAdapters.get('/adapters/raw-0')!, slotShapeOf(model.config)).bytes;

function options(overrides: Partial<EngineOptions> = {}, engineModel: LlamaModel = model): EngineOptions {
  return {
    model: engineModel,
    tokenizer,
    bank: bank.reader,
    loadLocalAdapter: memoryLoader(rawAdapters, corruptDirs),
    kvBudgetBytes: 256 * 2048,
    adapterBudgetBytes: 1 << 26,
    maxBatchTokens: 256,
    maxRunningRequests: 64,
    maxInputTokens: 128,
    maxTotalTokens: 256,
    blockSize: 8,
    seed: 7,
    ...overrides,
  };
}

const PROMPTS = ['hello world', 'the quick brown fox', 'a', 'LoRA adapters, many of them!', 'once upon a time there was', 'xyz 123'];

function local(i: number): Partial<GenerateRequest> {
  return { adapterId: `raw-${i}`, adapterSource: 'local', adapterPath: `/adapters/raw-${i}` };
}

/** A mix of 32 requests: 12 raw, 12 compressed (both clusters), 8 base; varied prompts and lengths. */
function mixedRequests(): GenerateRequest[] {
  const requests: GenerateRequest[] = [];
  for (let i = 0; i < 32; i++) {
    const adapter: Partial<GenerateRequest> = i % 4 === 3 ? {} : i % 2 === 0 ? local(i % 16) : { adapterId: `c${i % 3 === 0 ? 0 : 1}-${i % 7}` };
    requests.push({ prompt: PROMPTS[i % PROMPTS.length]! + ' '.repeat(i % 5), maxNewTokens: 3 + (i % 6), ignoreEos: true, ...adapter });
  }
  return requests;
}

describe('engine', () => {
  it('raw adapter output equals the merged-weights model (prefill and decode)', async () => {
    const withAdapter = await createEngine(options());
    const merged = await createEngine(options({}, mergedModel(model, rawAdapters.get('/adapters/raw-3')!)));
    const prompt = 'the quick brown fox jumps';
    const viaAdapter = await collect(withAdapter.generate({ prompt, maxNewTokens: 12, ignoreEos: true, ...local(3) }));
    const viaMerge = await collect(merged.generate({ prompt, maxNewTokens: 12, ignoreEos: true }));
    const base = await collect(withAdapter.generate({ prompt, maxNewTokens: 12, ignoreEos: true }));
    expect(viaAdapter.tokens).toHaveLength(12);
    expect(viaAdapter.tokens).toEqual(viaMerge.tokens);
    for (let i = 0; i < 12; i++) expect(viaAdapter.logprobs[i]!).toBeCloseTo(viaMerge.logprobs[i]!, 3);
    expect(base.tokens).not.toEqual(viaAdapter.tokens);
    expect(viaAdapter.finishReason).toBe('length');
    expect(viaAdapter.text).toBe(tokenizer.decode(viaAdapter.tokens, true));
  });

  it('compressed adapter output equals the same adapter exported raw', async () => {
    // f32 factors both ways: the math, not the bf16 rounding auto holds a bank with on an f32 model
    const engine = await createEngine(options({ loraDtype: 'f32' }));
    const prompt = 'once upon a time';
    const compressed = await collect(engine.generate({ prompt, maxNewTokens: 10, ignoreEos: true, adapterId: 'c1-3' }));
    const raw = await collect(engine.generate({ prompt, maxNewTokens: 10, ignoreEos: true, adapterId: 'exported', adapterSource: 'local', adapterPath: '/adapters/export-c1-3' }));
    expect(compressed.tokens).toEqual(raw.tokens);
    for (let i = 0; i < 10; i++) expect(compressed.logprobs[i]!).toBeCloseTo(raw.logprobs[i]!, 3);
    expect(engine.listAdapters().find((a) => a.id === 'c1-3')).toMatchObject({ storage: 'compressed', tier: 'resident', source: 'bank' });
  });

  it('loraDtype: auto is the model dtype (a bank in bf16 on an f32 model); bf16 factors and cores are the adapter rounded once, in half the bytes; f16 refuses what it cannot hold', async () => {
    const auto = await createEngine(options());
    expect(auto.info).toMatchObject({ modelDtype: 'f32', loraDtype: 'f32', bankDtype: 'bf16' });
    expect((await createEngine(options({}, bf16Copy(model)))).info).toMatchObject({ loraDtype: 'bf16', bankDtype: 'bf16' });
    const half = await createEngine(options({ loraDtype: 'bf16' }));
    expect(half.info).toMatchObject({ modelDtype: 'f32', loraDtype: 'bf16', bankDtype: 'bf16' });
    expect((await createEngine(options({ loraDtype: 'f32' }))).info).toMatchObject({ loraDtype: 'f32', bankDtype: 'f32' });
    // the same adapter with A and s·B rounded to bf16 beforehand, served with f32 factors
    const adapter = rawAdapters.get('/adapters/raw-3')!;
    const roundedModules = new Map([...adapter.modules].map(([path, m]) => [path, {
      ...m,
      a: bf16ArrayToF32(f32ArrayToBf16(m.a)),
      b: bf16ArrayToF32(f32ArrayToBf16(m.b.map((value) => value * m.scale))).map((value) => value / m.scale),
    }]));
    const rounded = await createEngine(options({ loadLocalAdapter: memoryLoader(new Map([['/adapters/raw-3', { ...adapter, modules: roundedModules }]])) }));
    const prompt = 'the quick brown fox jumps';
    const viaHalf = await collect(half.generate({ prompt, maxNewTokens: 12, ignoreEos: true, ...local(3) }));
    const viaRounded = await collect(rounded.generate({ prompt, maxNewTokens: 12, ignoreEos: true, ...local(3) }));
    expect(viaHalf.tokens).toEqual(viaRounded.tokens);
    for (let i = 0; i < 12; i++) expect(viaHalf.logprobs[i]!).toBeCloseTo(viaRounded.logprobs[i]!, 4);
    expect(half.listAdapters().find((a) => a.id === localAdapterKey('/adapters/raw-3'))?.bytes).toBe(rawBytes / 2);
    // compressed adapters: bases in bf16, the same tokens as the exported raw adapter in bf16 on this tiny model
    const compressed = await collect(half.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3' }));
    const exported = await collect(half.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'exported', adapterSource: 'local', adapterPath: '/adapters/export-c1-3' }));
    expect(compressed.tokens).toEqual(exported.tokens);
    // auto on an f32 model: the bank's adapter as the bf16 engine serves it, a PEFT adapter as the f32 one does
    const full = await createEngine(options({ loraDtype: 'f32' }));
    const autoCompressed = await collect(auto.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3' }));
    expect(autoCompressed.logprobs).toEqual(compressed.logprobs);
    const fullCompressed = await collect(full.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3' }));
    expect(autoCompressed.logprobs).not.toEqual(fullCompressed.logprobs);
    expect((await collect(auto.generate({ prompt, maxNewTokens: 12, ignoreEos: true, ...local(3) }))).logprobs)
      .toEqual((await collect(full.generate({ prompt, maxNewTokens: 12, ignoreEos: true, ...local(3) }))).logprobs);
    expect(auto.listAdapters().find((a) => a.id === 'c1-3')?.bytes).toBe(half.listAdapters().find((a) => a.id === 'c1-3')?.bytes);
    // a compressed adapter's own bytes are its cores: bf16 like the factors, half of f32
    await collect(full.generate({ prompt, maxNewTokens: 1, adapterId: 'c1-3' }));
    const coreBytes = full.listAdapters().find((a) => a.id === 'c1-3')!.bytes;
    expect(coreBytes).toBeGreaterThan(0);
    expect(half.listAdapters().find((a) => a.id === 'c1-3')?.bytes).toBe(coreBytes / 2);
    // f16 cannot hold 1e5: the request naming that adapter fails, naming the tensor; others are served
    const huge = randomLora(model.config, 7, 4, 8);
    const firstModule = [...huge.modules.values()][0]!;
    firstModule.a[5] = 1e5;
    const f16 = await createEngine(options({ loraDtype: 'f16', loadLocalAdapter: memoryLoader(new Map([['/adapters/huge', huge], ['/adapters/raw-3', adapter]])) }));
    await expect(collect(f16.generate({ prompt, maxNewTokens: 2, adapterId: 'huge', adapterSource: 'local', adapterPath: '/adapters/huge' })))
      .rejects.toThrow(new RegExp(`${firstModule.path}.lora_A: value 100000 at element 5 is beyond the f16 range`));
    expect((await collect(f16.generate({ prompt, maxNewTokens: 2, ignoreEos: true, ...local(3) }))).tokens).toHaveLength(2);
  });

  it('batch invariance: each of 32 mixed requests gets the same tokens alone and batched (chunked prefill too)', async () => {
    const requests = mixedRequests();
    const solo = await createEngine(options());
    const alone = [];
    for (const request of requests) alone.push(await collect(solo.generate(request)));
    const batched = await createEngine(options({ maxBatchTokens: 24 }));
    const together = await Promise.all(requests.map((r) => collect(batched.generate(r))));
    for (let i = 0; i < requests.length; i++) expect(together[i]!.tokens, `request ${i}`).toEqual(alone[i]!.tokens);
    expect(batched.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
  });

  it('cache pressure: a budget of 4 adapters serves 64 requests over 32 adapters, each equal to its solo run', async () => {
    const requests: GenerateRequest[] = [];
    for (let i = 0; i < 64; i++) {
      const n = i % 32;
      const adapter = n < 16 ? local(n) : { adapterId: `c${n % 2}-${(n - 16) >> 1}` };
      requests.push({ prompt: PROMPTS[i % PROMPTS.length]!, maxNewTokens: 4, ignoreEos: true, ...adapter });
    }
    const solo = await createEngine(options());
    const alone = [];
    for (const request of requests) alone.push(await collect(solo.generate(request)));
    const budget = 4 * rawBytes;
    const engine = await createEngine(options({ adapterBudgetBytes: budget, maxConcurrentLoads: 2 }));
    const together = await Promise.all(requests.map((r) => collect(engine.generate(r))));
    for (let i = 0; i < requests.length; i++) expect(together[i]!.tokens, `request ${i}`).toEqual(alone[i]!.tokens);
    const stats = engine.stats();
    expect(stats.adapterEvictions).toBeGreaterThan(0);
    expect(stats.adapterLoads).toBeGreaterThanOrEqual(32);
    expect(stats.adapterBytesResident).toBeLessThanOrEqual(budget);
    expect(stats.adapterHits + stats.adapterMisses).toBe(64);
  });

  it('preempts the youngest sequence when decode runs out of KV blocks, and still gives solo results', async () => {
    const requests: GenerateRequest[] = [0, 1, 2].map((i) => ({ prompt: PROMPTS[i]!, maxNewTokens: 24, ignoreEos: true, ...local(i) }));
    const solo = await createEngine(options());
    const alone = [];
    for (const request of requests) alone.push(await collect(solo.generate(request)));
    // 6 blocks of 8 positions; each request needs up to 5 blocks
    const tight = await createEngine(options({ kvBudgetBytes: 6 * 2048 }));
    const together = await Promise.all(requests.map((r) => collect(tight.generate(r))));
    for (let i = 0; i < requests.length; i++) expect(together[i]!.tokens).toEqual(alone[i]!.tokens);
    expect(tight.preemptions).toBeGreaterThan(0);
    expect(tight.stats().kvBlocksUsed).toBe(0);
  });

  it('cancellation frees rows and blocks', async () => {
    const engine = await createEngine(options());
    const controller = new AbortController();
    const iterator = engine.generate({ prompt: 'hello world', maxNewTokens: 200, ignoreEos: true, signal: controller.signal, ...local(1) })[Symbol.asyncIterator]();
    await iterator.next();
    await iterator.next();
    expect(engine.stats().kvBlocksUsed).toBeGreaterThan(0);
    controller.abort();
    await expect(iterator.next()).rejects.toMatchObject({ code: 'CANCELLED' });
    expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
    // abandoning the iterator (break) cancels too
    for await (const event of engine.generate({ prompt: 'abc', maxNewTokens: 200, ignoreEos: true })) {
      expect(event.type).toBe('token');
      break;
    }
    expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
  });

  it('seeds are reproducible, whatever else is in the batch', async () => {
    const engine = await createEngine(options());
    const request: GenerateRequest = { prompt: 'hello', maxNewTokens: 16, ignoreEos: true, sampling: { temperature: 1.5, topK: 20, topP: 0.95, seed: 42 }, ...local(2) };
    const first = await collect(engine.generate(request));
    const crowd = mixedRequests().slice(0, 8).map((r) => collect(engine.generate({ ...r, sampling: { temperature: 1.2, seed: 9 } })));
    const second = await collect(engine.generate(request));
    await Promise.all(crowd);
    const other = await collect(engine.generate({ ...request, sampling: { ...request.sampling, seed: 43 } }));
    expect(second.tokens).toEqual(first.tokens);
    expect(first.seed).toBe(42);
    expect(other.tokens).not.toEqual(first.tokens);
    const greedy = await collect(engine.generate({ prompt: 'hello', maxNewTokens: 4 }));
    expect(greedy.seed).toBeNull();
  });

  it('stop sequences end generation and are excluded from the text', async () => {
    const engine = await createEngine(options());
    const full = await collect(engine.generate({ prompt: 'the quick', maxNewTokens: 20, ignoreEos: true, ...local(5) }));
    const stop = full.text.slice(4, 6);
    const cut = full.text.indexOf(stop);
    const stopped = await collect(engine.generate({ prompt: 'the quick', maxNewTokens: 20, ignoreEos: true, stop: ['not-there', stop], ...local(5) }));
    expect(stopped.finishReason).toBe('stop_sequence');
    expect(stopped.text).toBe(full.text.slice(0, cut));
    expect(stopped.tokens.length).toBeLessThan(20);
    // the cut-off rest, for LoRAX's generated_text: with it, the text is every generated token's
    expect(stopped.stopText!.startsWith(stop)).toBe(true);
    expect(stopped.text + stopped.stopText).toBe(tokenizer.decode(stopped.tokens, true));
    expect(full.stopText).toBeUndefined();
  });

  it('a stop in the text the detokenizer held back to the end (an unfinished character) still stops it', async () => {
    // find a greedy run whose last token appears nowhere before it, then let that token spell "be" + a UTF-8 lead byte
    let found: { prompt: string; last: number; tokens: number[] } | null = null;
    const plain = await createEngine(options());
    for (const prompt of [...PROMPTS, 'abc', 'xyz', 'once', 'hello there', 'qwerty']) {
      const run = await collect(plain.generate({ prompt, maxNewTokens: 6, ignoreEos: true }));
      const last = run.tokens.at(-1)!;
      if (run.tokens.indexOf(last) === run.tokens.length - 1 && !tokenizer.isSpecial(last)) {
        found = { prompt, last, tokens: run.tokens };
        break;
      }
    }
    expect(found).not.toBeNull();
    const { prompt, last, tokens } = found!;
    const bytesOf = (id: number): number[] => (id === last ? [0x62, 0x65, 0xe6] : [...Buffer.from(tokenizer.decode([id], true), 'utf8')]);
    const partial = { ...tokenizer, decode: (ids: readonly number[], skip: boolean) => (ids.some((id) => id === last) ? Buffer.from(ids.flatMap(bytesOf)).toString('utf8') : tokenizer.decode(ids, skip)) };
    const engine = await createEngine(options({ tokenizer: partial }));
    const before = tokenizer.decode(tokens.slice(0, -1), true);
    const free = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true }));
    expect(free).toMatchObject({ finishReason: 'length', text: `${before}be\uFFFD` }); // the tail comes out at the end
    const stopped = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true, stop: ['be'] }));
    expect(stopped).toMatchObject({ finishReason: 'stop_sequence', text: before, stopText: 'be\uFFFD' });
  });

  it('a stop sequence may be a special token\'s text (as LoRAX/TGI match it), and it cuts the text where it starts', async () => {
    const engine = await createEngine(options());
    // a prompt whose greedy run makes eos (id 1) while eos is ignored
    let found: { prompt: string; at: number; text: string; next: string } | null = null;
    for (const prompt of ['hello world', ...PROMPTS, 'abc', 'xyz', 'once']) {
      const run = await collect(engine.generate({ prompt, maxNewTokens: 60, ignoreEos: true }));
      const at = run.tokens.indexOf(1);
      if (at > 0 && at + 1 < run.tokens.length && run.tokens[at + 1]! > 1) {
        found = { prompt, at, text: tokenizer.decode(run.tokens.slice(0, at), true), next: tokenizer.decode([run.tokens[at + 1]!], true) };
        break;
      }
    }
    expect(found).not.toBeNull();
    const { prompt, at, text, next } = found!;
    // a stop that starts in the special token and goes on after it (as "<|im_end|>\n")
    const after = await collect(engine.generate({ prompt, maxNewTokens: 60, ignoreEos: true, stop: [`</s>${next}`] }));
    expect(after).toMatchObject({ finishReason: 'stop_sequence', text });
    expect(after.tokens.length).toBe(at + 2);
    const stopped = await collect(engine.generate({ prompt, maxNewTokens: 60, ignoreEos: true, stop: ['</s>'] }));
    expect(stopped).toMatchObject({ finishReason: 'stop_sequence', text });
    expect(stopped.tokens.length).toBe(at + 1);
    // a stop that ends in the special token's text starts in the text before it
    const spanning = await collect(engine.generate({ prompt, maxNewTokens: 60, ignoreEos: true, stop: [`${text.slice(-1)}</s>`] }));
    expect(spanning).toMatchObject({ finishReason: 'stop_sequence', text: text.slice(0, -1) });
  });

  it('a text prompt holding a token outside the model\'s vocabulary is refused at submission; the running batch goes on', async () => {
    const wide = charTokenizer();
    const engine = await createEngine(options({ tokenizer: { ...wide, encode: (text, special) => [...wide.encode(text, special), ...(text.includes('~') ? [model.config.vocabSize + 3] : [])] } }));
    const bystander = engine.generate({ prompt: 'hello world', maxNewTokens: 12, ignoreEos: true })[Symbol.asyncIterator]();
    await bystander.next();
    const bad = collect(engine.generate({ prompt: 'room ~', maxNewTokens: 4 }));
    await expect(bad).rejects.toMatchObject({ code: 'VALIDATION', context: { field: 'inputs', limit: model.config.vocabSize } });
    await expect(bad).rejects.toThrow(/prompt token 7 \(id 67, "8"\) is outside the model's vocabulary \[0, 64\)/);
    let tokens = 1;
    for (let event = await bystander.next(); !event.done; event = await bystander.next()) if (event.value.type === 'token') tokens++;
    expect(tokens).toBe(12);
  });

  it('a release callback that throws fails no request: the held registration finishes, the engine goes on', async () => {
    const engine = await createEngine(options());
    const warnings: string[] = [];
    const onWarning = (warning: Error): void => void warnings.push(warning.message);
    process.on('warning', onWarning);
    try {
      await engine.registerAdapter('reloaded', '/adapters/raw-3', { onRelease: () => { throw new Error('EACCES: permission denied'); } });
      const bystander = collect(engine.generate({ prompt: 'bystander', maxNewTokens: 10, ignoreEos: true }));
      const held = engine.generate({ prompt: 'hello', maxNewTokens: 10, ignoreEos: true, adapterId: 'reloaded' })[Symbol.asyncIterator]();
      await held.next();
      await engine.registerAdapter('reloaded', '/adapters/raw-4'); // the old registration is dropped when `held` ends
      let last: unknown;
      for (let event = await held.next(); !event.done; event = await held.next()) last = event.value;
      expect(last).toMatchObject({ type: 'done', finishReason: 'length', generatedTokens: 10 });
      expect((await bystander).finishReason).toBe('length');
      // the new registration serves
      const after = await collect(engine.generate({ prompt: 'hello', maxNewTokens: 4, ignoreEos: true, adapterId: 'reloaded' }));
      const raw4 = await collect(engine.generate({ prompt: 'hello', maxNewTokens: 4, ignoreEos: true, ...local(4) }));
      expect(after.tokens).toEqual(raw4.tokens);
      await new Promise((resolve) => setImmediate(resolve));
      expect(warnings.some((w) => /adapter reloaded: its release callback failed: EACCES/.test(w))).toBe(true);
      expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('reports every step to onStep once, a step that fails after the forward pass too', async () => {
    const base = charTokenizer();
    let calls = 0;
    const tokenizer = { ...base, isSpecial: (id: number) => { if (++calls === 3) throw new Error('boom while emitting'); return base.isSpecial(id); } };
    const engine = await createEngine(options({ tokenizer }));
    const steps: string[] = [];
    engine.onStep!((step) => steps.push(`${step.method}:${step.ok ? 'ok' : 'failed'}`));
    await expect(collect(engine.generate({ prompt: 'hello', maxNewTokens: 5, ignoreEos: true }))).rejects.toThrow(/boom while emitting/);
    expect(steps).toEqual(['prefill:ok', 'decode:ok', 'decode:failed']);
    await engine.close();
  });

  it('a signal shared by many requests holds no listener once they end', async () => {
    const engine = await createEngine(options());
    const controller = new AbortController();
    const { EventEmitter } = await import('node:events');
    const getEventListeners = EventEmitter.getEventListeners;
    for (let i = 0; i < 12; i++) await collect(engine.generate({ prompt: 'hi', maxNewTokens: 2, ignoreEos: true, signal: controller.signal }));
    expect(getEventListeners(controller.signal, 'abort')).toHaveLength(0);
    const running = engine.generate({ prompt: 'hi', maxNewTokens: 200, ignoreEos: true, signal: controller.signal })[Symbol.asyncIterator]();
    await running.next();
    expect(getEventListeners(controller.signal, 'abort')).toHaveLength(1);
    controller.abort();
    await expect(running.next()).rejects.toMatchObject({ code: 'CANCELLED' });
  });

  it('a corrupt adapter fails only the requests that name it', async () => {
    const engine = await createEngine(options());
    const good = mixedRequests().slice(0, 6).map((r) => collect(engine.generate(r)));
    const badBank = collect(engine.generate({ prompt: 'hi', maxNewTokens: 4, adapterId: 'c0-8' }));
    const badLocal = collect(engine.generate({ prompt: 'hi', maxNewTokens: 4, adapterId: 'broken', adapterSource: 'local', adapterPath: '/adapters/broken' }));
    await expect(badBank).rejects.toMatchObject({ code: 'ADAPTER_LOAD', context: { file: '/banks/hand/c0-8/cores.safetensors' } });
    await expect(badLocal).rejects.toMatchObject({ code: 'ADAPTER_LOAD' });
    await expect(badLocal).rejects.toThrow(/\/adapters\/broken\/adapter_model.safetensors.*truncated/);
    for (const result of await Promise.all(good)) expect(result.finishReason).toBe('length');
    expect(engine.listAdapters().find((a) => a.id === 'c0-8')).toMatchObject({ tier: 'failed' });
    expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, kvBlocksUsed: 0 });
  });

  it("a request naming a directory under another adapter's id does not replace that adapter for others", async () => {
    const engine = await createEngine(options());
    const prompt = 'hello world';
    const before = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3' }));
    // a caller names a local folder with the bank adapter's id (and with the same id twice, two folders)
    const viaFolder = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3', adapterSource: 'local', adapterPath: '/adapters/raw-1' }));
    const asRaw1 = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true, ...local(1) }));
    expect(viaFolder.tokens).toEqual(asRaw1.tokens);
    const after = await collect(engine.generate({ prompt, maxNewTokens: 6, ignoreEos: true, adapterId: 'c1-3' }));
    expect(after.tokens).toEqual(before.tokens);
    expect(after.tokens).not.toEqual(viaFolder.tokens);
    const listed = engine.listAdapters();
    expect(listed.find((a) => a.id === 'c1-3')).toMatchObject({ source: 'bank' });
    expect(listed.find((a) => a.id === localAdapterKey('/adapters/raw-1'))).toMatchObject({ source: 'local', tier: 'resident' });
    await engine.close();
  });

  it('refuses engine options that could never serve (0 adapter loads at once would leave every adapter request waiting)', async () => {
    for (const maxConcurrentLoads of [0, -1, 1.5]) {
      await expect(createEngine(options({ maxConcurrentLoads }))).rejects.toMatchObject({ code: 'CONFIG', context: { field: 'maxConcurrentLoads' } });
    }
    await (await createEngine(options({ maxConcurrentLoads: 1 }))).close();
  });

  it('rejects bad requests from the first next() with a coded error', async () => {
    const engine = await createEngine(options());
    const first = (request: GenerateRequest): Promise<unknown> => engine.generate(request)[Symbol.asyncIterator]().next();
    await expect(first({ prompt: 'x'.repeat(200), maxNewTokens: 4 })).rejects.toMatchObject({ code: 'VALIDATION', context: { limit: 128 } });
    await expect(first({ prompt: 'x'.repeat(100), maxNewTokens: 200 })).rejects.toMatchObject({ code: 'VALIDATION', context: { field: 'max_new_tokens' } });
    await expect(first({ prompt: 'hi', maxNewTokens: 0 })).rejects.toMatchObject({ code: 'VALIDATION' });
    await expect(first({ prompt: 'hi', maxNewTokens: 4, adapterId: 'nope' })).rejects.toMatchObject({ code: 'ADAPTER_NOT_FOUND' });
    await expect(first({ prompt: 'hi', maxNewTokens: 4, sampling: { topP: 1.5 } })).rejects.toMatchObject({ code: 'VALIDATION', context: { field: 'top_p' } });
    await expect(first({ prompt: [1, 2, 999], maxNewTokens: 4 })).rejects.toMatchObject({ code: 'VALIDATION' });
    // truncate keeps the last N prompt tokens
    const truncated = await collect(engine.generate({ prompt: 'zzzz the end', truncate: 4, maxNewTokens: 3, ignoreEos: true }));
    const tail = await collect(engine.generate({ prompt: tokenizer.encode('zzzz the end', true).slice(-4), maxNewTokens: 3, ignoreEos: true }));
    expect(truncated.tokens).toEqual(tail.tokens);
  });

  it('reports logprobs, alternatives and prompt details; registers, pins and removes adapters; drains', async () => {
    const engine = await createEngine(options());
    const events = [];
    for await (const event of engine.generate({ prompt: 'hello', maxNewTokens: 3, ignoreEos: true, topAlternatives: 3, prefillDetails: true })) events.push(event);
    const token = events[0]!;
    expect(token.type).toBe('token');
    if (token.type === 'token') {
      expect(token.alternatives).toHaveLength(3);
      expect(token.alternatives![0]!.id).toBe(token.token.id); // greedy picks the top alternative
      expect(token.token.logprob).toBeLessThanOrEqual(0);
    }
    const done = events[events.length - 1]!;
    expect(done.type === 'done' && done.prefill?.length).toBe(6);

    const status = await engine.registerAdapter('mine', '/adapters/raw-4');
    expect(status).toMatchObject({ id: 'mine', source: 'local', storage: 'raw' });
    await expect(engine.registerAdapter('bad', '/adapters/broken')).rejects.toSatisfy((e) => isSoppuError(e));
    await engine.pinAdapter('mine', true);
    const viaRegistered = await collect(engine.generate({ prompt: 'abc', maxNewTokens: 5, ignoreEos: true, adapterId: 'mine' }));
    const viaPath = await collect(engine.generate({ prompt: 'abc', maxNewTokens: 5, ignoreEos: true, ...local(4) }));
    expect(viaRegistered.tokens).toEqual(viaPath.tokens);
    expect(engine.listAdapters().find((a) => a.id === 'mine')).toMatchObject({ pinned: true, tier: 'resident' });
    // hot reload: the id now names another adapter
    await engine.registerAdapter('mine', '/adapters/raw-6');
    const reloaded = await collect(engine.generate({ prompt: 'abc', maxNewTokens: 5, ignoreEos: true, adapterId: 'mine' }));
    const raw6 = await collect(engine.generate({ prompt: 'abc', maxNewTokens: 5, ignoreEos: true, ...local(6) }));
    expect(reloaded.tokens).toEqual(raw6.tokens);
    await engine.removeAdapter('mine');
    expect(engine.hasAdapter('mine')).toBe(false);

    const pending = collect(engine.generate({ prompt: 'hello', maxNewTokens: 3, ignoreEos: true }));
    await engine.drain(10_000);
    expect((await pending).finishReason).toBe('length');
    await expect(engine.generate({ prompt: 'hi', maxNewTokens: 2 })[Symbol.asyncIterator]().next()).rejects.toMatchObject({ code: 'SHUTTING_DOWN' });
    expect(engine.tokenize('ab').ids).toEqual([0, 2, 3]);
    expect(engine.detokenize([0, 2, 3])).toBe('ab');
  });
});
