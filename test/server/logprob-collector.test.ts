/** The OpenAI logprobs the collector renders: texts and offsets that add up to the returned text. */
import { describe, expect, it } from 'vitest';
import type { TokenInfo } from '../../src/engine/engine-types.js';
import { LogprobCollector } from '../../src/server/logprob-collector.js';

const utf8 = (text: string): number[] => [...Buffer.from(text, 'utf8')];
/** Tokens with ids 0, 1, …, whose own bytes `bytesOf` gives (as the engine's tokenBytes). */
const byId = new Map<number, number[]>();
const token = (text: string, bytes: number[], special = false): TokenInfo => {
  const id = byId.size;
  byId.set(id, bytes);
  return { id, text, logprob: -1, special };
};
const bytesOf = (id: number): number[] => byId.get(id)!;
type Completion = { tokens: string[]; text_offset: number[] };

describe('LogprobCollector (completions)', () => {
  it("echo: a SentencePiece token's leading space is the start of the text, not a shift of every later token", () => {
    const collector = new LogprobCollector('completion', 11, bytesOf);
    collector.addPrompt([token('<s>', utf8('<s>'), true), token('Hello', utf8(' Hello')), token('world', utf8(' world'))], undefined, 'Hello world');
    const rendered = collector.render(collector.all()) as Completion;
    expect(rendered.tokens).toEqual(['', 'Hello', ' world']);
    expect(rendered.text_offset).toEqual([0, 0, 5]);
  });

  it('echo: a prompt of token ids ending inside a character still adds up to the echoed text', () => {
    const echoed = 'A\uFFFD';
    const collector = new LogprobCollector('completion', echoed.length, bytesOf);
    collector.addPrompt([token('A', [0x41]), token('\uFFFD', [0xe2, 0x82])], undefined, echoed);
    expect((collector.render(collector.all()) as Completion).tokens.join('')).toBe(echoed);
  });

  it("an eos after a token holding part of a character stands at the text's end once the text is finished", () => {
    const collector = new LogprobCollector('completion', 0, bytesOf);
    collector.add(token('Hi', utf8('Hi')));
    collector.add(token('', [0xe2]));
    collector.add(token('<|end_of_text|>', utf8('<|end_of_text|>'), true));
    const answer = 'Hi\uFFFD';
    collector.finish(answer, 0);
    const rendered = collector.render(collector.all(answer.length)) as Completion;
    expect(rendered.tokens).toEqual(['Hi', '\uFFFD', '<|end_of_text|>']);
    expect(rendered.text_offset).toEqual([0, 2, 3]);
  });
});
