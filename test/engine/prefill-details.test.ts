/**
 * Prompt logprobs (decoder_input_details) do not depend on how the prompt was cut into chunks: a chunk of
 * one row, a one-token prompt, and a prompt whose prefill a preemption interrupted all give the entries of
 * a prompt run alone in one piece.
 */
import { describe, expect, it } from 'vitest';
import { createEngine, type EngineOptions } from '../../src/engine/engine.js';
import type { GenerateEvent, GenerateRequest } from '../../src/engine/engine-types.js';
import { charTokenizer, tinyModel } from './helpers.js';

const model = tinyModel(11);
const options = (overrides: Partial<EngineOptions> = {}): EngineOptions => ({
  model, tokenizer: charTokenizer(), kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 20, maxBatchTokens: 256,
  maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7, ...overrides,
});

type Done = Extract<GenerateEvent, { type: 'done' }>;
async function done(events: AsyncIterable<GenerateEvent>): Promise<Done> {
  for await (const event of events) if (event.type === 'done') return event;
  throw new Error('no done event');
}

/** The prefill entries as comparable values (NaN for the first token). */
const entries = (d: Done): [number, number][] => d.prefill!.map((t) => [t.id, Number.isNaN(t.logprob) ? Number.NaN : Math.round(t.logprob * 1e4) / 1e4]);

describe('prompt logprobs', () => {
  const details: Partial<GenerateRequest> = { maxNewTokens: 2, ignoreEos: true, prefillDetails: true, prefillDistributions: true };

  it('a one-row chunk, a one-token prompt and a last chunk of one row are recorded like any other', async () => {
    const solo = await createEngine(options());
    const alone = await done(solo.generate({ prompt: 'hello', ...details } as GenerateRequest));
    expect(alone.prefill).toHaveLength(6); // BOS and the five characters
    // batched behind a 4-token prompt with 5 batch tokens: this prompt's first chunk is one row
    const tight = await createEngine(options({ maxBatchTokens: 5 }));
    const [, together] = await Promise.all([
      done(tight.generate({ prompt: 'abc', maxNewTokens: 2, ignoreEos: true })),
      done(tight.generate({ prompt: 'hello', ...details } as GenerateRequest)),
    ]);
    expect(entries(together)).toEqual(entries(alone));
    expect(together.prefillDistributions).toHaveLength(alone.prefillDistributions!.length);
    const one = await done(solo.generate({ prompt: [0], ...details } as GenerateRequest));
    expect(one.prefill).toHaveLength(1);
    expect(one.prefillDistributions).toHaveLength(1);
    const chunked = await done((await createEngine(options({ maxBatchTokens: 8 }))).generate({ prompt: 'abcdefgh', ...details } as GenerateRequest)); // 9 tokens: 8 + 1
    const whole = await done(solo.generate({ prompt: 'abcdefgh', ...details } as GenerateRequest));
    expect(entries(chunked)).toEqual(entries(whole));
    expect(chunked.prefillDistributions).toHaveLength(whole.prefillDistributions!.length);
  });

  it('with topAlternatives, each prompt token also gets its top alternatives from the model\'s distribution', async () => {
    const engine = await createEngine(options());
    const d = await done(engine.generate({ prompt: 'hello', maxNewTokens: 1, ignoreEos: true, prefillDetails: true, prefillDistributions: true, topAlternatives: 3 }));
    expect(d.prefillAlternatives).toHaveLength(d.prefill!.length);
    expect(d.prefillAlternatives![0]).toEqual([]); // nothing scores the first token
    for (let p = 1; p < d.prefill!.length; p++) {
      const distribution = d.prefillDistributions![p - 1]!;
      const best = [...distribution.keys()].sort((a, b) => distribution[b]! - distribution[a]! || a - b).slice(0, 3);
      expect(d.prefillAlternatives![p]!.map((t) => t.id)).toEqual(best);
      d.prefillAlternatives![p]!.forEach((t) => expect(t.logprob).toBeCloseTo(distribution[t.id]!, 5));
      expect(d.prefillAlternatives![p]![0]!.logprob).toBeGreaterThanOrEqual(d.prefill![p]!.logprob - 1e-6);
    }
    const without = await done(engine.generate({ prompt: 'hello', maxNewTokens: 1, ignoreEos: true, prefillDetails: true }));
    expect(without.prefillAlternatives).toBeUndefined();
  });

  it('a prefill interrupted by a preemption records every prompt token once', async () => {
    const prompt = 'abcdefghijklmnopqrstuvw';
    const alone = await done((await createEngine(options())).generate({ prompt, maxNewTokens: 2, ignoreEos: true, prefillDetails: true }));
    const engine = await createEngine(options({ kvBudgetBytes: 5 * 2048, maxBatchTokens: 3 }));
    const [, squeezed] = await Promise.all([
      done(engine.generate({ prompt: 'hello', maxNewTokens: 30, ignoreEos: true })),
      done(engine.generate({ prompt, maxNewTokens: 2, ignoreEos: true, prefillDetails: true })),
    ]);
    expect(engine.preemptions).toBeGreaterThan(0);
    expect(entries(squeezed)).toEqual(entries(alone));
  });
});
