/**
 * Integration with the engine: a real bank (written by the bank writer, read by the bank reader) served
 * by the engine gives the same tokens and logprobs for a compressed adapter as its PEFT export served
 * raw, and the bank's raw-kept slots serve like the original adapter.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { refitBank } from '../../src/compress/bank-refit.js';
import { removeFromBank } from '../../src/compress/bank-remove.js';
import { openBank, type Bank } from '../../src/compress/bank-reader.js';
import { exportAdapter } from '../../src/compress/export-adapter.js';
import { createEngine } from '../../src/engine/engine.js';
import { charTokenizer, collect, randomLora, tinyModel } from '../engine/helpers.js';
import { testServer } from '../server/helpers.js';

const model = tinyModel(11);
let root: string;
let bank: Bank;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-bank-engine-'));
  const adapters = [0, 1, 2, 3].map((i) => ({ id: `user-${i}`, adapter: randomLora(model.config, 40 + i, 4, 8) }));
  await compressIntoBank(adapters, join(root, 'bank'), { compress: { method: 'jd-full', rank: 6, seed: 1 } });
  bank = await openBank(join(root, 'bank'));
  await exportAdapter(bank, 'user-2', join(root, 'export-2'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('a bank changed on disk while served', () => {
  it('reloadBank serves the new version: new ids, removed ids gone, refit weights with their own bases (not the cached ones)', async () => {
    const dir = join(root, 'changing');
    const adapters = [0, 1, 2].map((i) => ({ id: `user-${i}`, adapter: randomLora(model.config, 60 + i, 4, 8) }));
    await compressIntoBank(adapters, dir, { compress: { method: 'jd-full', rank: 6, seed: 1 } });
    const options = { model, tokenizer: charTokenizer(), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26, maxBatchTokens: 256, maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7 };
    const engine = await createEngine({ ...options, bankDir: dir });
    const run = (e: typeof engine, adapterId: string) => collect(e.generate({ prompt: 'once upon a time', maxNewTokens: 8, ignoreEos: true, adapterId }));
    try {
      await run(engine, 'user-0'); // resident: its cluster's bases are cached
      const before = (await openBank(dir)).manifest.basesFiles;
      // what `soppu bank add` and `soppu bank refit` do from another process
      await addToBank(dir, 'late', randomLora(model.config, 70, 4, 8));
      await refitBank(dir);
      expect((await openBank(dir)).manifest.basesFiles).not.toEqual(before);
      expect(engine.hasAdapter('late')).toBe(false); // not seen until reloaded
      expect(await engine.reloadBank!()).toEqual({ adapters: 4 });
      const fresh = await createEngine({ ...options, bankDir: dir });
      try {
        for (const id of ['user-0', 'user-1', 'late']) {
          const served = await run(engine, id);
          const expected = await run(fresh, id);
          expect(served.tokens, id).toEqual(expected.tokens);
          for (let i = 0; i < 8; i++) expect(served.logprobs[i]!, id).toBeCloseTo(expected.logprobs[i]!, 4);
        }
      } finally {
        await fresh.close();
      }
      await removeFromBank(dir, 'user-2');
      // the admin route does the same (and SIGHUP in `soppu serve`)
      const server = testServer(engine);
      try {
        const reloaded = await server.app.inject({ method: 'POST', url: '/bank/reload' });
        expect(reloaded.statusCode).toBe(200);
        expect(reloaded.json()).toEqual({ adapters: 3 });
      } finally {
        await server.app.close();
      }
      await expect(run(engine, 'user-2')).rejects.toMatchObject({ code: 'ADAPTER_NOT_FOUND' });
    } finally {
      await engine.close();
    }
  });
});

describe('bank served by the engine', () => {
  it('a bank adapter generates as its PEFT export does', async () => {
    expect(Object.values(bank.adapter('user-2').perSlot).some((p) => p.storage === 'compressed')).toBe(true);
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bank, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26, maxBatchTokens: 256,
      maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
      loraDtype: 'f32', // the bank's math, not the bf16 rounding auto holds it with on an f32 model
    });
    try {
      const prompt = 'once upon a time';
      const fromBank = await collect(engine.generate({ prompt, maxNewTokens: 10, ignoreEos: true, adapterId: 'user-2' }));
      const fromExport = await collect(engine.generate({ prompt, maxNewTokens: 10, ignoreEos: true, adapterId: 'exported', adapterSource: 'local', adapterPath: join(root, 'export-2') }));
      const base = await collect(engine.generate({ prompt, maxNewTokens: 10, ignoreEos: true }));
      expect(fromBank.tokens).toEqual(fromExport.tokens);
      for (let i = 0; i < 10; i++) expect(fromBank.logprobs[i]!).toBeCloseTo(fromExport.logprobs[i]!, 3);
      expect(fromBank.logprobs).not.toEqual(base.logprobs);
    } finally {
      await engine.close();
    }
  });
});
