/**
 * End-of-sequence ids: an instruct model lists its end-of-turn id in generation_config.json (Llama-3's
 * <|eot_id|>, Qwen2's <|im_end|>), not in config.json; generation stops on it all the same.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine } from '../../src/engine/engine.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { collect } from './helpers.js';

let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-eos-'));
  await generateModel({ out: join(root, 'model'), seed: 3 });
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const options = (dir: string) => ({
  modelDir: dir, kvBudgetBytes: 8 << 20, adapterBudgetBytes: 1 << 24, maxBatchTokens: 256, maxRunningRequests: 4,
  maxInputTokens: 128, maxTotalTokens: 256, blockSize: 16, seed: 1,
});

describe('end-of-sequence ids', () => {
  it("stops on an id that only generation_config.json names, and reports it in the engine's info", async () => {
    const dir = join(root, 'model');
    const plain = await createEngine(options(dir));
    const free = await collect(plain.generate({ prompt: 'The quick brown fox', maxNewTokens: 12, ignoreEos: true }));
    await plain.close();
    const stopAt = free.tokens[4]!;
    const first = free.tokens.indexOf(stopAt);
    const configEos = plain.info.eosTokenIds;
    expect(configEos).not.toContain(stopAt);
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [...configEos, stopAt] }));
    const engine = await createEngine(options(dir));
    expect(engine.info.eosTokenIds).toContain(stopAt);
    const stopped = await collect(engine.generate({ prompt: 'The quick brown fox', maxNewTokens: 12 }));
    expect(stopped.finishReason).toBe('eos_token');
    expect(stopped.tokens).toEqual(free.tokens.slice(0, first + 1));
    await engine.close();
  });
});
