/**
 * truncate tokenizes a long text from its tail: the tokens kept are the whole text's last ones, and the
 * tokenizer never sees more than (truncate + margin) × maxTokenChars characters (a megabyte prompt with
 * truncate held the event loop for seconds).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { createEngine } from '../../src/engine/engine.js';
import { promptTail, TRUNCATE_MARGIN_TOKENS } from '../../src/engine/prompt-tail.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { ModelTokenizer } from '../../src/model/tokenizer.js';
import { OPEN_ACCESS_CALLER } from '../../src/server/access-control.js';
import { GenerationService } from '../../src/server/generation-service.js';
import { DEFAULT_SERVER_OPTIONS } from '../../src/server/server-options.js';
import { Random } from '../../src/tensor/random.js';
import { collect } from './helpers.js';

let root = '';
let modelDir = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-tail-'));
  modelDir = (await generateModel({ out: join(root, 'model'), seed: 4 })).dir;
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
afterEach(() => {
  vi.restoreAllMocks();
});

/** Seeded text of words, punctuation and some non-ASCII (a surrogate pair among them). */
function words(count: number, seed: number): string {
  const random = new Random(seed);
  const vocabulary = ['the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dogs', 'café', 'naïve', '😀', 'x1', 'and,', 'then.', '\n', '  '];
  const out: string[] = [];
  for (let i = 0; i < count; i++) out.push(vocabulary[Math.floor(random.next() * vocabulary.length)]!);
  return out.join(' ');
}

describe('promptTail', () => {
  it('keeps a short text whole and cuts a long one to (truncate + margin) × maxTokenChars characters', () => {
    expect(promptTail('hello there', 2, 5)).toBe('hello there');
    expect(promptTail('x'.repeat(1000), 4, 3)).toBe('x'.repeat((4 + TRUNCATE_MARGIN_TOKENS) * 3));
    expect(promptTail('x'.repeat(1000), 4, undefined)).toHaveLength(1000); // no bound known: whole
  });

  it('never starts inside a surrogate pair', () => {
    const keep = (1 + TRUNCATE_MARGIN_TOKENS) * 1;
    const text = 'a'.repeat(100) + '😀' + 'b'.repeat(keep - 1); // the cut falls between the pair's halves
    const tail = promptTail(text, 1, 1);
    expect(tail).toBe('b'.repeat(keep - 1));
  });

  it("the tail's last tokens are the whole text's, with and without special tokens", async () => {
    const tokenizer = await ModelTokenizer.load(modelDir);
    const text = words(3000, 7);
    for (const addSpecialTokens of [true, false]) {
      const whole = tokenizer.encode(text, { addSpecialTokens });
      for (const truncate of [1, 7, 60, 400]) {
        const tail = promptTail(text, truncate, tokenizer.maxTokenChars);
        expect(tail.length).toBeLessThan(text.length);
        expect(tokenizer.encode(tail, { addSpecialTokens }).slice(-truncate), `truncate ${truncate}`).toEqual(whole.slice(-truncate));
      }
    }
  });
});

describe('engine truncate', () => {
  it('tokenizes only the tail of a long prompt, and generates as from the whole prompt cut to its last tokens', async () => {
    const engine = await createEngine({
      modelDir, kvBudgetBytes: 8 << 20, adapterBudgetBytes: 1 << 20, maxBatchTokens: 256, maxRunningRequests: 2,
      maxInputTokens: 128, maxTotalTokens: 256, blockSize: 16, seed: 1,
    });
    const tokenizer = await ModelTokenizer.load(modelDir);
    const text = words(40_000, 9);
    const lastIds = tokenizer.encode(text).slice(-8);
    const seen: number[] = [];
    const encode = ModelTokenizer.prototype.encode;
    vi.spyOn(ModelTokenizer.prototype, 'encode').mockImplementation(function (this: ModelTokenizer, input: string, options?: { addSpecialTokens?: boolean }) {
      seen.push(input.length);
      return encode.call(this, input, options);
    });
    // the server's count of the prompt's tokens too
    const service = new GenerationService(engine, { ...DEFAULT_SERVER_OPTIONS, maxInputTokens: 128, maxTotalTokens: 256, adapterDirs: [], uploadDir: root, accessControl: null });
    const prepared = service.prepare({ prompt: text, adapterId: '', adapterSource: 'bank', addSpecialTokens: true, maxNewTokens: 4, truncate: 8, stop: [], sampling: {}, ignoreEos: true } as never, OPEN_ACCESS_CALLER, new AbortController().signal);
    expect(prepared.maxNewTokens).toBe(4);
    expect(seen.length).toBeGreaterThan(0);
    expect(Math.max(...seen)).toBeLessThanOrEqual((8 + TRUNCATE_MARGIN_TOKENS) * tokenizer.maxTokenChars);
    seen.length = 0;
    const truncated = await collect(engine.generate({ prompt: text, truncate: 8, maxNewTokens: 4, ignoreEos: true }));
    expect(seen.length).toBeGreaterThan(0);
    expect(Math.max(...seen)).toBeLessThanOrEqual((8 + TRUNCATE_MARGIN_TOKENS) * tokenizer.maxTokenChars);
    vi.restoreAllMocks();
    const fromIds = await collect(engine.generate({ prompt: lastIds, maxNewTokens: 4, ignoreEos: true }));
    expect(truncated.tokens).toEqual(fromIds.tokens);
    await engine.close();
  });
});
