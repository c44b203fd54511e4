/**
 * Integration with the engine: a real bank (written by the bank writer, read by the bank reader) served
 * by the engine gives the same tokens and logprobs for a compressed adapter as its PEFT export served
 * raw, and the bank's raw-kept slots serve like the original adapter.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank, type Bank } from '../../src/compress/bank-reader.js';
import { exportAdapter } from '../../src/compress/export-adapter.js';
import { createEngine } from '../../src/engine/engine.js';
import { charTokenizer, collect, randomLora, tinyModel } from '../engine/helpers.js';

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

describe('bank served by the engine', () => {
  it('a bank adapter generates as its PEFT export does', async () => {
    expect(Object.values(bank.adapter('user-2').perSlot).some((p) => p.storage === 'compressed')).toBe(true);
    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bank, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26, maxBatchTokens: 256,
      maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
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
