/**
 * registerAdapter with compress: the PEFT directory is projected onto a real bank's shared bases,
 * written into the bank, and served compressed — generating as the bank's own reconstruction of it.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { exportAdapter } from '../../src/compress/export-adapter.js';
import { createEngine } from '../../src/engine/engine.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';
import { saveLoraAdapter } from '../../src/io/save-lora-adapter.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { charTokenizer, collect, randomLora, tinyModel } from './helpers.js';

const model = tinyModel(11);
let root = '';

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-register-'));
  const adapters = [0, 1, 2].map((i) => ({ id: `user-${i}`, adapter: randomLora(model.config, 60 + i, 4, 8) }));
  await compressIntoBank(adapters, join(root, 'bank'), { compress: { method: 'jd-full', rank: 6, seed: 1 } });
  await saveLoraAdapter(join(root, 'new-adapter'), randomLora(model.config, 70, 4, 8));
  for (const i of [0, 1]) await saveLoraAdapter(join(root, `concurrent-${i}`), randomLora(model.config, 80 + i, 4, 8));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/**
 * A PEFT loader whose second read of the folder ending in `name` (the load for serving: the first is
 * a registration's check) waits until `openGate` is called.
 */
function gatedSecondRead(name: string): { loadLocalAdapter: (dir: string) => Promise<LoraAdapter>; openGate: () => void } {
  let reads = 0;
  let openGate: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (openGate = resolve));
  const loadLocalAdapter = async (dir: string): Promise<LoraAdapter> => {
    if (dir.endsWith(name) && ++reads === 2) await gate;
    return loadLoraAdapter(dir);
  };
  return { loadLocalAdapter, openGate };
}

describe('registerAdapter with compress', () => {
  it('projects into the bank and serves the adapter compressed', async () => {
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir: join(root, 'bank'), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
      loraDtype: 'f32', // the projection's math, not the bf16 rounding auto holds a bank with on an f32 model
    });
    expect(engine.hasAdapter('fresh')).toBe(false);
    const status = await engine.registerAdapter('fresh', join(root, 'new-adapter'), { compress: true });
    expect(status).toMatchObject({ id: 'fresh', source: 'bank' });
    expect(engine.hasAdapter('fresh')).toBe(true);
    const reopened = await openBank(join(root, 'bank'));
    expect(reopened.has('fresh')).toBe(true);
    await exportAdapter(reopened, 'fresh', join(root, 'fresh-export'));
    const prompt = 'hello world';
    const served = await collect(engine.generate({ prompt, maxNewTokens: 8, ignoreEos: true, adapterId: 'fresh' }));
    const exported = await collect(engine.generate({ prompt, maxNewTokens: 8, ignoreEos: true, adapterId: 'x', adapterSource: 'local', adapterPath: join(root, 'fresh-export') }));
    expect(served.tokens).toEqual(exported.tokens);
    for (let i = 0; i < 8; i++) expect(served.logprobs[i]!).toBeCloseTo(exported.logprobs[i]!, 3);
    expect(engine.listAdapters().find((a) => a.id === 'fresh')).toMatchObject({ source: 'bank', tier: 'resident' });
    // the existing bank adapters still serve
    const old = await collect(engine.generate({ prompt, maxNewTokens: 4, ignoreEos: true, adapterId: 'user-1' }));
    expect(old.finishReason).toBe('length');
    // hot reload: registering the id again replaces the bank's adapter
    let released = 0;
    await engine.registerAdapter('fresh', join(root, 'concurrent-0'), { compress: true, onRelease: () => released++ });
    expect(released).toBe(1); // the directory is not read again once it is in the bank
    // a pin or unpin made while the bank is written holds (it was read before the write and re-applied after)
    await engine.registerAdapter('fresh', join(root, 'concurrent-1'), { compress: true, onRelease: () => void engine.pinAdapter('fresh', true) });
    expect(engine.listAdapters().find((a) => a.id === 'fresh')?.pinned).toBe(true);
    await engine.registerAdapter('fresh', join(root, 'concurrent-0'), { compress: true, onRelease: () => void engine.pinAdapter('fresh', false) });
    expect(engine.listAdapters().find((a) => a.id === 'fresh')?.pinned).toBe(false);
    const replaced = await openBank(join(root, 'bank'));
    expect(replaced.manifest.adapters.filter((a) => a.id === 'fresh')).toHaveLength(1);
    await exportAdapter(replaced, 'fresh', join(root, 'fresh-export-2'));
    const reloaded = await collect(engine.generate({ prompt, maxNewTokens: 8, ignoreEos: true, adapterId: 'fresh' }));
    const reExported = await collect(engine.generate({ prompt, maxNewTokens: 8, ignoreEos: true, adapterId: 'y', adapterSource: 'local', adapterPath: join(root, 'fresh-export-2') }));
    expect(reloaded.tokens).toEqual(reExported.tokens);
    expect(reloaded.tokens).not.toEqual(served.tokens);
    // removing a bank adapter takes it out of the bank
    await engine.removeAdapter('fresh');
    expect(engine.hasAdapter('fresh')).toBe(false);
    expect((await openBank(join(root, 'bank'))).has('fresh')).toBe(false);
    await expect(collect(engine.generate({ prompt, maxNewTokens: 2, adapterId: 'fresh' }))).rejects.toMatchObject({ code: 'ADAPTER_NOT_FOUND' });
    await expect(engine.removeAdapter('fresh')).rejects.toMatchObject({ code: 'ADAPTER_NOT_FOUND' });
    expect(engine.hasAdapter('user-1')).toBe(true);
    await engine.close();
  });

  it('an adapter naming the bank\'s model otherwise is refused, and taken with ignoreBaseModel (the upload\'s ignore_base_model=true)', async () => {
    const bankDir = join(root, 'bank-named');
    const named = (seed: number, base: string) => { const adapter = randomLora(model.config, seed, 4, 8); return { ...adapter, config: { ...adapter.config, baseModelNameOrPath: base } }; };
    await compressIntoBank([0, 1, 2].map((i) => ({ id: `named-${i}`, adapter: named(140 + i, 'org/tiny') })), bankDir, { compress: { method: 'jd-full', rank: 6, seed: 1 } });
    await saveLoraAdapter(join(root, 'elsewhere'), named(150, '/models/tiny'));
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
    });
    await expect(engine.registerAdapter('elsewhere', join(root, 'elsewhere'), { compress: true })).rejects.toThrow(/base model "\/models\/tiny" differs from the bank's "org\/tiny"/);
    await expect(engine.registerAdapter('elsewhere', join(root, 'elsewhere'), { compress: true, ignoreBaseModel: true })).resolves.toMatchObject({ id: 'elsewhere', source: 'bank' });
    await engine.close();
  });

  it('lists a bank adapter the bank holds raw as raw before it loads (it was reported compressed until then)', async () => {
    const bankDir = join(root, 'bank-raw');
    // unrelated adapters within 1 %: shared bases would cost more than the raw factors, so every slot stays raw
    const adapters = [0, 1, 2].map((i) => ({ id: `raw-${i}`, adapter: randomLora(model.config, 130 + i, 4, 8) }));
    await compressIntoBank(adapters, bankDir, { compress: { method: 'jd-full', maxError: 0.01, seed: 1 } });
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
    });
    expect(engine.listAdapters().find((a) => a.id === 'raw-0')).toMatchObject({ tier: 'disk', storage: 'raw' });
    await collect(engine.generate({ prompt: 'hi', maxNewTokens: 1, adapterId: 'raw-0' }));
    expect(engine.listAdapters().find((a) => a.id === 'raw-0')).toMatchObject({ tier: 'resident', storage: 'raw' });
    // auto holds the bank's raw members in bf16 on this f32 model, as its compressed ones: half the f32 bytes
    const f32 = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7, loraDtype: 'f32',
    });
    await collect(f32.generate({ prompt: 'hi', maxNewTokens: 1, adapterId: 'raw-0' }));
    const f32Bytes = f32.listAdapters().find((a) => a.id === 'raw-0')!.bytes;
    expect(f32Bytes).toBeGreaterThan(0);
    expect(engine.listAdapters().find((a) => a.id === 'raw-0')!.bytes).toBe(f32Bytes / 2);
    await f32.close();
    await engine.close();
  });

  it('a pinned bank adapter registered again with compress loads its new version once, and stays pinned', async () => {
    const bankDir = join(root, 'bank-pinned');
    const adapters = [0, 1, 2].map((i) => ({ id: `pinned-${i}`, adapter: randomLora(model.config, 110 + i, 4, 8) }));
    await compressIntoBank(adapters, bankDir, { compress: { method: 'jd-full', rank: 6, seed: 1 } });
    const loads: string[] = [];
    const counting = async (dir: string) => {
      const bank = await openBank(dir);
      const loadAdapter = bank.loadAdapter.bind(bank);
      return Object.assign(bank, { loadAdapter: (id: string) => (loads.push(id), loadAdapter(id)) });
    };
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
    }, { openBank: counting });
    await engine.pinAdapter('pinned-0', true);
    while (engine.listAdapters().find((a) => a.id === 'pinned-0')?.tier !== 'resident') await new Promise((r) => setTimeout(r, 5));
    expect(loads).toEqual(['pinned-0']);
    await engine.registerAdapter('pinned-0', join(root, 'concurrent-0'), { compress: true });
    while (engine.listAdapters().find((a) => a.id === 'pinned-0')?.tier !== 'resident') await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    expect(loads).toEqual(['pinned-0', 'pinned-0']); // was three: the new version loaded, dropped and loaded again
    expect(engine.listAdapters().find((a) => a.id === 'pinned-0')).toMatchObject({ pinned: true, source: 'bank' });
    await engine.close();
  });

  it('a request that holds a bank adapter still waiting to load finishes with it after the adapter is removed from the bank', async () => {
    const bankDir = join(root, 'bank-remove-held');
    const adapters = [0, 1, 2].map((i) => ({ id: `held-${i}`, adapter: randomLora(model.config, 90 + i, 4, 8) }));
    await compressIntoBank(adapters, bankDir, { compress: { method: 'jd-full', rank: 6, seed: 1 } });
    const exported = join(root, 'held-1-export');
    await exportAdapter(await openBank(bankDir), 'held-1', exported);
    // one load at a time, and a local adapter's load for serving (its second read) waits for the gate
    const { loadLocalAdapter, openGate } = gatedSecondRead('concurrent-0');
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26, maxConcurrentLoads: 1,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7, loadLocalAdapter,
      loraDtype: 'f32', // compared with its f32 export below: the bank's math, not auto's bf16 rounding of it
    });
    const prompt = 'hello world';
    await engine.registerAdapter('slow', join(root, 'concurrent-0'));
    const slow = collect(engine.generate({ prompt, maxNewTokens: 4, ignoreEos: true, adapterId: 'slow' }));
    await new Promise((resolve) => setTimeout(resolve, 5));
    const queued = collect(engine.generate({ prompt, maxNewTokens: 5, ignoreEos: true, adapterId: 'held-1' }));
    await new Promise((resolve) => setTimeout(resolve, 5));
    await engine.removeAdapter('held-1'); // while its request waits for the load slot
    expect(engine.hasAdapter('held-1')).toBe(false);
    await engine.removeAdapter('held-2'); // a second change: held-1's files must outlive it too
    openGate();
    expect((await slow).finishReason).toBe('length');
    const served = await queued; // before: ADAPTER_LOAD, the reopened bank holds no held-1
    // it generated with the adapter as the bank held it (exported before the removal)
    const asExported = await collect(engine.generate({ prompt, maxNewTokens: 5, ignoreEos: true, adapterId: 'x', adapterSource: 'local', adapterPath: exported }));
    expect(served.tokens).toEqual(asExported.tokens);
    await engine.close();
  });

  it('a bank made for another model is refused when the engine starts, naming a slot that does not fit', async () => {
    const bankDir = join(root, 'bank-other-model');
    const slots = [{ path: 'model.layers.0.self_attn.q_proj', inFeatures: 16, outFeatures: 16 }];
    await compressIntoBank(syntheticAdapterSet({ slots, count: 2, rank: 2, sharedRank: 1, seed: 1 }), bankDir, { compress: { method: 'jd-full', rank: 1, seed: 1 } });
    const d = model.config.hiddenSize;
    await expect(createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 20,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8,
    })).rejects.toMatchObject({ code: 'ADAPTER_INCOMPATIBLE', message: `bank ${bankDir} does not fit this model: its slot model.layers.0.self_attn.q_proj is [16, 16] (out, in), the model's is [${d}, ${d}]` });
    // slots none of which is a layer of the model (a GPT-2 bank): refused too
    const gpt2 = join(root, 'bank-gpt2');
    await compressIntoBank(syntheticAdapterSet({ slots: [{ path: 'transformer.h.0.attn.c_attn', inFeatures: d, outFeatures: 3 * d }], count: 2, rank: 2, sharedRank: 1, seed: 1 }), gpt2, { compress: { method: 'jd-full', rank: 1, seed: 1 } });
    await expect(createEngine({
      model, tokenizer: charTokenizer(), bankDir: gpt2, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 20,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8,
    })).rejects.toMatchObject({ code: 'ADAPTER_INCOMPATIBLE', message: expect.stringContaining('none of its slots (transformer.h.0.attn.c_attn, …) is a linear layer of the model') });
  });

  it('a bank one adapter of which also adapts a layer the model has not (lm_head) serves: only that adapter fails', async () => {
    const d = model.config.hiddenSize;
    const bankDir = join(root, 'bank-lm-head');
    const q = { path: 'model.layers.0.self_attn.q_proj', inFeatures: d, outFeatures: d };
    const good = syntheticAdapterSet({ slots: [q], count: 1, rank: 2, sharedRank: 1, seed: 1, idPrefix: 'good-' });
    const odd = syntheticAdapterSet({ slots: [q, { path: 'lm_head', inFeatures: d, outFeatures: model.config.vocabSize }], count: 1, rank: 2, sharedRank: 1, seed: 2, idPrefix: 'odd-' });
    await compressIntoBank([...good, ...odd], bankDir, { compress: { method: 'jd-full', rank: 1, seed: 1 } });
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 20,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8,
    });
    expect((await collect(engine.generate({ prompt: 'hi', maxNewTokens: 2, ignoreEos: true, adapterId: 'good-0' }))).finishReason).toBe('length');
    await expect(collect(engine.generate({ prompt: 'hi', maxNewTokens: 2, adapterId: 'odd-0' }))).rejects.toMatchObject({ message: expect.stringContaining('lm_head') });
    await engine.close();
  });

  it('calls onRelease for a raw registration once it is replaced and no request holds it', async () => {
    // the first registration's load for serving (its second read: the first is registration's check) waits
    const { loadLocalAdapter, openGate } = gatedSecondRead('concurrent-0');
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir: join(root, 'bank'), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7, loadLocalAdapter,
    });
    const released: string[] = [];
    await engine.registerAdapter('mine', join(root, 'concurrent-0'), { onRelease: () => released.push('first') });
    // a request holds the first registration (its adapter still loading) while it is replaced
    const request = collect(engine.generate({ prompt: 'hello', maxNewTokens: 4, ignoreEos: true, adapterId: 'mine' }));
    await new Promise((resolve) => setTimeout(resolve, 10));
    await engine.registerAdapter('mine', join(root, 'concurrent-1'), { onRelease: () => released.push('second') });
    expect(released).toEqual([]); // the request still has to load the first directory
    openGate();
    expect((await request).finishReason).toBe('length');
    expect(released).toEqual(['first']);
    await engine.removeAdapter('mine'); // nobody holds the second: released at once
    expect(released).toEqual(['first', 'second']);
    await engine.close();
  });

  it('registrations and removals of one id take effect in call order, however long each load takes', async () => {
    // each directory's load waits until its gate opens
    const gates = new Map<string, { opened: Promise<void>; open: () => void }>();
    const gateOf = (name: string): { opened: Promise<void>; open: () => void } => {
      let open: () => void = () => undefined;
      const opened = new Promise<void>((resolve) => (open = resolve));
      const gate = { opened, open };
      gates.set(join(root, name), gate);
      return gate;
    };
    const loadLocalAdapter = async (dir: string): Promise<LoraAdapter> => {
      await gates.get(dir)?.opened;
      return loadLoraAdapter(dir);
    };
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7, loadLocalAdapter,
    });
    const slowGate = gateOf('concurrent-0');
    const slow = engine.registerAdapter('same', join(root, 'concurrent-0'));
    const fast = engine.registerAdapter('same', join(root, 'concurrent-1'));
    setTimeout(slowGate.open, 20);
    await Promise.all([slow, fast]);
    const served = await collect(engine.generate({ prompt: 'hello', maxNewTokens: 4, ignoreEos: true, adapterId: 'same' }));
    const later = await collect(engine.generate({ prompt: 'hello', maxNewTokens: 4, ignoreEos: true, adapterId: 'z', adapterSource: 'local', adapterPath: join(root, 'concurrent-1') }));
    expect(served.tokens).toEqual(later.tokens); // the later registration won, though the earlier one finished loading last
    // a removal sent while a registration of the id is still loading is not undone by it
    const loading = gateOf('new-adapter');
    const registration = engine.registerAdapter('other', join(root, 'new-adapter'));
    const removal = engine.removeAdapter('other');
    setTimeout(loading.open, 20);
    await registration;
    await removal;
    expect(engine.hasAdapter('other')).toBe(false);
    await engine.close();
  });

  it('registers two adapters with compress at once: both land in the bank and both serve', async () => {
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bankDir: join(root, 'bank'), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26,
      maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
    });
    await Promise.all([0, 1].map((i) => engine.registerAdapter(`together-${i}`, join(root, `concurrent-${i}`), { compress: true })));
    const reopened = await openBank(join(root, 'bank'));
    for (const i of [0, 1]) {
      expect(reopened.has(`together-${i}`)).toBe(true);
      expect(engine.hasAdapter(`together-${i}`)).toBe(true);
      const out = await collect(engine.generate({ prompt: 'hi', maxNewTokens: 3, ignoreEos: true, adapterId: `together-${i}` }));
      expect(out.finishReason).toBe('length');
    }
    await engine.close();
  });
});
