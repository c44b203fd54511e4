/**
 * The OpenAI routes over the real engine and a generated model with a byte-level BPE tokenizer and a
 * chat template (multi-character tokens, BOS, special tokens), with the official client: a stream
 * adds up to the non-stream text (stop sequences inside a token, special tokens), a chat prompt holds
 * one BOS, and /tokenize honours add_special_tokens.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine } from '../../src/engine/engine.js';
import type { Engine } from '../../src/engine/engine-types.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import type { SoppuServer } from '../../src/server/create-server.js';
import { sseEvents, testServer } from './helpers.js';

let root = '';
let engine: Engine;
let server: SoppuServer;
let client: OpenAI;
let base = '';

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-openai-real-'));
  await generateModel({ out: join(root, 'model'), seed: 3 });
  engine = await createEngine({
    modelDir: join(root, 'model'), kvBudgetBytes: 8 << 20, adapterBudgetBytes: 1 << 24, maxBatchTokens: 512, maxRunningRequests: 16,
    maxInputTokens: 1000, maxTotalTokens: 1024, blockSize: 16, seed: 1,
  });
  server = testServer(engine);
  await server.app.listen({ port: 0, host: '127.0.0.1' });
  const address = server.app.server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  base = `http://127.0.0.1:${address.port}`;
  client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
});
afterAll(async () => {
  await server.app.close();
  await engine.close();
  await rm(root, { recursive: true, force: true });
});

const CHAT = [{ role: 'user' as const, content: 'Hello there' }];

async function streamedCompletion(args: OpenAI.CompletionCreateParamsNonStreaming): Promise<{ text: string; finish: string | null }> {
  let text = '';
  let finish: string | null = null;
  for await (const chunk of await client.completions.create({ ...args, stream: true })) {
    text += chunk.choices[0]?.text ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  return { text, finish };
}

async function streamedChat(args: OpenAI.ChatCompletionCreateParamsNonStreaming): Promise<{ text: string; finish: string | null }> {
  let text = '';
  let finish: string | null = null;
  for await (const chunk of await client.chat.completions.create({ ...args, stream: true })) {
    text += chunk.choices[0]?.delta?.content ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  return { text, finish };
}

describe('OpenAI routes over a BPE model', () => {
  it('a stream adds up to the non-stream text, whatever stop sequence ends it (inside a token too)', async () => {
    const args = { model: '', prompt: 'The quick brown fox', max_tokens: 24, temperature: 0 };
    const free = (await client.completions.create(args)).choices[0]!.text;
    expect(free.length).toBeGreaterThan(6);
    // every two-character piece of the free text, as a stop: most end inside a multi-character token
    const stops = [...new Set(Array.from({ length: free.length - 1 }, (_, i) => free.slice(i, i + 2)).filter((s) => s.trim().length === 2))].slice(0, 8);
    expect(stops.length).toBeGreaterThan(2);
    for (const stop of stops) {
      const plain = (await client.completions.create({ ...args, stop: [stop] })).choices[0]!;
      expect(plain.text).toBe(free.slice(0, free.indexOf(stop)));
      const streamed = await streamedCompletion({ ...args, stop: [stop] });
      expect(streamed.text, `stop ${JSON.stringify(stop)}`).toBe(plain.text);
      expect(streamed.finish).toBe('stop');
    }
  });

  it('chat streams carry no special-token text: the stream equals the message, to eos or past it', async () => {
    // past eos this model emits special tokens (so the case below has some to skip)
    let specials = 0;
    for await (const event of engine.generate({ prompt: engine.applyChatTemplate(CHAT, true), addSpecialTokens: false, maxNewTokens: 120, ignoreEos: true })) {
      if (event.type === 'token' && event.token.special) specials++;
    }
    expect(specials).toBeGreaterThan(0);
    for (const extra of [{}, { ignore_eos_token: true, max_tokens: 120 }, { ignore_eos_token: true, max_tokens: 120, stop: ['zzz'] }]) {
      const args = { model: '', messages: CHAT, max_tokens: 40, temperature: 0, ...extra } as OpenAI.ChatCompletionCreateParamsNonStreaming;
      const message = (await client.chat.completions.create(args)).choices[0]!.message.content ?? '';
      const streamed = await streamedChat(args);
      expect(streamed.text).toBe(message);
      expect(streamed.text).not.toMatch(/<\|[a-z_]+\|>/);
    }
  });

  it('a chat prompt holds the template\'s BOS once; /tokenize adds BOS only when asked', async () => {
    const templated = engine.applyChatTemplate(CHAT, true);
    const ids = engine.tokenize(templated, false).ids;
    const bos = engine.tokenize('', true).ids;
    expect(bos).toHaveLength(1);
    expect(ids[0]).toBe(bos[0]);
    expect(ids[1]).not.toBe(bos[0]);
    const completion = await client.chat.completions.create({ model: '', messages: CHAT, max_tokens: 2, temperature: 0 });
    expect(completion.usage?.prompt_tokens).toBe(ids.length);
    const tokenize = async (body: Record<string, unknown>): Promise<{ id: number }[]> =>
      (await fetch(`${base}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })).json() as Promise<{ id: number }[]>;
    expect((await tokenize({ inputs: 'hi' }))[0]!.id).toBe(bos[0]);
    expect((await tokenize({ inputs: 'hi', add_special_tokens: false })).map((t) => t.id)).toEqual(engine.tokenize('hi', false).ids);
  });

  it('temperature 0 decodes greedily whatever top_p, top_k or seed come with it (OpenAI clients send a top_p by default)', async () => {
    const args = { model: '', prompt: 'The quick brown fox', max_tokens: 16, temperature: 0, ignore_eos_token: true } as OpenAI.CompletionCreateParamsNonStreaming;
    const greedy = (await client.completions.create(args)).choices[0]!.text;
    for (const extra of [{ top_p: 0.9, seed: 1 }, { top_p: 0.9, seed: 2 }, { top_k: 50, seed: 1 }] as const) {
      expect((await client.completions.create({ ...args, ...extra } as OpenAI.CompletionCreateParamsNonStreaming)).choices[0]!.text, JSON.stringify(extra)).toBe(greedy);
    }
    const chat = { model: '', messages: CHAT, max_tokens: 12, temperature: 0, ignore_eos_token: true } as OpenAI.ChatCompletionCreateParamsNonStreaming;
    const chatGreedy = (await client.chat.completions.create(chat)).choices[0]!.message.content;
    expect((await client.chat.completions.create({ ...chat, top_p: 0.8, seed: 5 })).choices[0]!.message.content).toBe(chatGreedy);
  });

  it('logprobs: completions {tokens, token_logprobs, top_logprobs, text_offset}; chat content entries with bytes; streamed per chunk', async () => {
    const args = { model: '', prompt: 'The quick brown fox', max_tokens: 12, temperature: 0, ignore_eos_token: true } as OpenAI.CompletionCreateParamsNonStreaming;
    const completion = (await client.completions.create({ ...args, logprobs: 2 })).choices[0]!;
    const lp = completion.logprobs!;
    expect(lp.tokens!.join('')).toBe(completion.text);
    expect(lp.tokens).toHaveLength(12);
    expect(lp.token_logprobs!.every((v) => v <= 0 && Number.isFinite(v))).toBe(true);
    expect(lp.text_offset![0]).toBe(0);
    for (let i = 1; i < 12; i++) expect(lp.text_offset![i]).toBe(lp.text_offset![i - 1]! + lp.tokens![i - 1]!.length);
    for (const [i, top] of lp.top_logprobs!.entries()) {
      const entries = Object.entries(top as Record<string, number>);
      expect(entries.length).toBeGreaterThan(0); // two alternatives, unless both decode to the same text
      expect(entries.length).toBeLessThanOrEqual(2);
      expect(Math.max(...entries.map(([, v]) => v))).toBeCloseTo(lp.token_logprobs![i]!, 5); // greedy: the best is the chosen
    }
    // echo: the prompt's tokens lead, scored by the model (the first: null), as a loglikelihood client reads them
    const echo = await client.completions.create({ ...args, logprobs: 2, echo: true });
    const echoed = echo.choices[0]!;
    const elp = echoed.logprobs!;
    const promptTokens = echo.usage!.prompt_tokens;
    expect(elp.tokens).toHaveLength(promptTokens + 12);
    expect(elp.tokens!.join('')).toBe(echoed.text); // BOS has no text in it
    expect(elp.token_logprobs![0]).toBeNull();
    expect(elp.top_logprobs![0]).toBeNull();
    expect(elp.text_offset![promptTokens]).toBe('The quick brown fox'.length);
    expect(elp.token_logprobs!.slice(promptTokens)).toEqual(lp.token_logprobs);
    const details = (await (await fetch(`${base}/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'The quick brown fox', parameters: { max_new_tokens: 1, decoder_input_details: true } }) })).json()) as { details: { prefill: { logprob: number | null }[] } };
    expect(details.details.prefill).toHaveLength(promptTokens);
    for (let i = 1; i < promptTokens; i++) {
      expect(elp.token_logprobs![i]).toBeCloseTo(details.details.prefill[i]!.logprob!, 4);
      const top = Object.values(elp.top_logprobs![i] as Record<string, number>);
      expect(top.length).toBeGreaterThan(0);
      expect(Math.max(...top)).toBeGreaterThanOrEqual(elp.token_logprobs![i]! - 1e-5); // the best is at least the actual token
    }
    await expect(client.completions.create({ ...args, logprobs: 1, echo: true, stream: true })).rejects.toMatchObject({ status: 400, error: { param: 'echo' } });
    // a prompt with characters split over tokens and a literal special token: every prompt token is listed,
    // their texts add up to the echoed text at increasing offsets
    for (const prompt of ['Hi 🎉🎉 日本語 ok', 'Hello<|end|> world']) {
      const e = await client.completions.create({ ...args, prompt, max_tokens: 2, logprobs: 1, echo: true });
      const l = e.choices[0]!.logprobs!;
      expect(l.tokens, prompt).toHaveLength(e.usage!.prompt_tokens + 2);
      expect(l.tokens!.join(''), prompt).toBe(e.choices[0]!.text);
      expect(e.choices[0]!.text.startsWith(prompt)).toBe(true);
      for (let i = 1; i < l.tokens!.length; i++) expect(l.text_offset![i]).toBe(l.text_offset![i - 1]! + l.tokens![i - 1]!.length);
    }
    // the prompt as token ids (as lm-eval-harness sends it): the same tokens, the same completion and logprobs
    const ids = ((await (await fetch(`${base}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'The quick brown fox' }) })).json()) as { id: number }[]).map((t) => t.id);
    expect(ids).toHaveLength(promptTokens);
    for (const prompt of [ids, [ids]]) {
      const byIds = await client.completions.create({ ...args, prompt, logprobs: 2, echo: true });
      expect(byIds.choices[0]!.text).toBe(echoed.text);
      expect(byIds.choices[0]!.logprobs!.token_logprobs).toEqual(elp.token_logprobs);
      expect(byIds.usage!.prompt_tokens).toBe(promptTokens);
    }
    // several prompts: a choice each, in order, the prompt tokens of each counted once
    const two = await client.completions.create({ ...args, prompt: [ids, ids] });
    expect(two.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(two.choices[0]!.text).toBe(two.choices[1]!.text);
    expect(two.choices[0]!.text).toBe(completion.text);
    expect(two.usage).toEqual({ prompt_tokens: 2 * promptTokens, completion_tokens: 24, total_tokens: 2 * promptTokens + 24 });
    // n choices of one prompt: sampled with seed, seed + 1, …, so they differ; the prompt counted once
    const sampled = await client.completions.create({ ...args, temperature: 1, seed: 5, n: 3 });
    expect(sampled.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    expect(new Set(sampled.choices.map((c) => c.text)).size).toBeGreaterThan(1);
    expect(sampled.usage!.prompt_tokens).toBe(promptTokens);
    const first = await client.completions.create({ ...args, temperature: 1, seed: 5 });
    expect(first.choices[0]!.text).toBe(sampled.choices[0]!.text);
    const chatTwo = await client.chat.completions.create({ model: '', messages: CHAT, max_tokens: 4, temperature: 1, seed: 9, n: 2 });
    expect(chatTwo.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(chatTwo.choices[0]!.message.role).toBe('assistant');
    await expect(client.completions.create({ ...args, prompt: [1, 10 ** 6] })).rejects.toMatchObject({ status: 400, error: { message: expect.stringContaining('outside the vocabulary') } });
    expect(await client.completions.create({ ...args })).toMatchObject({ choices: [{ logprobs: null }] });

    const chatArgs = { model: '', messages: CHAT, max_tokens: 10, temperature: 0, ignore_eos_token: true } as OpenAI.ChatCompletionCreateParamsNonStreaming;
    const chat = (await client.chat.completions.create({ ...chatArgs, logprobs: true, top_logprobs: 3 })).choices[0]!;
    const content = chat.logprobs!.content!;
    expect(content.map((c) => c.token).join('')).toBe(chat.message.content);
    // bytes are each token's own: joined and decoded they are the text (a random model also makes invalid
    // UTF-8, which both sides show as U+FFFD), also where a token holds part of a character
    expect(Buffer.from(content.flatMap((c) => c.bytes!)).toString('utf8')).toBe(chat.message.content);
    const partial = content.filter((c) => c.token === ''); // a token whose text the decoder holds back
    expect(partial.length).toBeGreaterThan(0);
    for (const entry of partial) expect(entry.bytes!.length).toBeGreaterThan(0); // before: [] (the bytes of '')
    for (const entry of content) {
      expect(entry.top_logprobs).toHaveLength(3);
      expect(entry.top_logprobs[0]!.logprob).toBeCloseTo(entry.logprob, 5);
    }
    let streamedText = '';
    const streamedTokens: string[] = [];
    for await (const chunk of await client.chat.completions.create({ ...chatArgs, logprobs: true, stream: true })) {
      streamedText += chunk.choices[0]?.delta?.content ?? '';
      for (const entry of chunk.choices[0]?.logprobs?.content ?? []) streamedTokens.push(entry.token);
    }
    expect(streamedText).toBe(chat.message.content);
    // a stream's tokens come with their events: text the decoder only lets go at the end has no token of its own
    expect(streamedText.startsWith(streamedTokens.join(''))).toBe(true);
    expect(streamedTokens).toHaveLength(10);
    await expect(client.chat.completions.create({ ...chatArgs, top_logprobs: 2 })).rejects.toMatchObject({ status: 400, error: { param: 'top_logprobs' } });
  });

  it('stream_options.include_usage: a last chunk without choices carries usage; without it no chunk does', async () => {
    const args = { model: '', messages: CHAT, max_tokens: 5, temperature: 0, ignore_eos_token: true } as OpenAI.ChatCompletionCreateParamsNonStreaming;
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of await client.chat.completions.create({ ...args, stream: true, stream_options: { include_usage: true } })) chunks.push(chunk);
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ completion_tokens: 5 });
    expect(chunks.slice(0, -1).every((c) => c.usage === null && c.choices.length === 1)).toBe(true);
    const plain: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of await client.chat.completions.create({ ...args, stream: true })) plain.push(chunk);
    expect(plain.every((c) => c.usage === undefined && c.choices.length === 1)).toBe(true);
  });

  it("a stop's tokens are in neither the streamed nor the whole answer's logprobs, and the two agree (also around special tokens)", async () => {
    type Logprobs = { tokens: string[]; text_offset: number[] };
    const ask = async (stop: string[], stream: boolean): Promise<{ text: string; logprobs: Logprobs }> => {
      const response = await fetch(`${base}/v1/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: '', prompt: "It's", max_tokens: 40, temperature: 0, logprobs: 1, stop, stream }),
      });
      if (!stream) {
        const body = (await response.json()) as { choices: { text: string; logprobs: Logprobs }[] };
        return body.choices[0]!;
      }
      const chunks = sseEvents(await response.text()).filter((c): c is { choices: { text: string; logprobs: Logprobs | null }[] } => c !== '[DONE]');
      const logprobs: Logprobs = { tokens: [], text_offset: [] };
      for (const chunk of chunks) {
        const piece = chunk.choices[0]?.logprobs;
        if (piece) {
          logprobs.tokens.push(...piece.tokens);
          logprobs.text_offset.push(...piece.text_offset);
        }
      }
      return { text: chunks.map((c) => c.choices[0]?.text ?? '').join(''), logprobs };
    };
    const free = await ask([], false);
    const special = free.logprobs.tokens.findIndex((t) => /^<\|.*\|>$/.test(t));
    expect(special).toBeGreaterThan(2); // this fixture's greedy answer to "It's" holds a special token (not eos)
    const next = free.logprobs.tokens[special + 1]!;
    for (const stop of [`${free.logprobs.tokens[special]!}${next}`, free.logprobs.tokens[special - 1]!.slice(-1) + free.logprobs.tokens[special]!]) {
      const whole = await ask([stop], false);
      const streamed = await ask([stop], true);
      expect(streamed.text, stop).toBe(whole.text);
      expect(streamed.logprobs, stop).toEqual({ tokens: whole.logprobs.tokens, text_offset: whole.logprobs.text_offset });
      expect(whole.logprobs.tokens, stop).not.toContain(free.logprobs.tokens[special]!); // the special token begins or ends the stop
      expect(whole.logprobs.tokens.join('').startsWith(whole.text), stop).toBe(true);
    }
  });

  it('refuses a prompt too long to fit before tokenizing it, on /generate and /tokenize alike', async () => {
    const maxTokenChars = engine.info.maxTokenChars!;
    expect(maxTokenChars).toBeGreaterThan(1);
    const post = (path: string, body: unknown) => fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const long = 'a'.repeat(1002 * maxTokenChars + 1); // max_input_tokens is 1000 here
    const generate = await post('/generate', { inputs: long, parameters: { max_new_tokens: 1 } });
    expect(generate.status).toBe(422);
    expect(((await generate.json()) as { error: string }).error).toMatch(/must have less than 1000 tokens\. Given: \d+ characters/);
    const tokenize = await post('/tokenize', { inputs: 'a'.repeat(1026 * maxTokenChars + 1) });
    expect(tokenize.status).toBe(422);
    // a prompt within the bound still gets its exact count
    const near = await post('/generate', { inputs: 'a'.repeat(1500), parameters: { max_new_tokens: 1 } });
    expect([200, 422]).toContain(near.status);
    if (near.status === 422) expect(((await near.json()) as { error: string }).error).toMatch(/Given: \d+$/);
    // the OpenAI routes name the field as their requests do
    // chat: refused before the template renders it (messages of one character each: rendering 100k of them held
    // the event loop ~0.9 s)
    const template = engine.applyChatTemplate.bind(engine);
    let templated = 0;
    engine.applyChatTemplate = (messages, addGenerationPrompt) => (templated++, template(messages, addGenerationPrompt));
    try {
      for (const messages of [[{ role: 'user', content: long }], Array.from({ length: 999 }, () => ({ role: 'user', content: 'a'.repeat(2 * maxTokenChars) }))]) {
        const chatTooLong = await post('/v1/chat/completions', { model: '', messages, max_tokens: 1 });
        expect(chatTooLong.status).toBe(400);
        expect(((await chatTooLong.json()) as { error: { param: string } }).error.param).toBe('messages');
      }
      expect(templated).toBe(0);
    } finally {
      engine.applyChatTemplate = template;
    }
    const completionTooLong = await post('/v1/completions', { model: '', prompt: long, max_tokens: 1 });
    expect(((await completionTooLong.json()) as { error: { param: string } }).error.param).toBe('prompt');
    // with truncate, a long prompt is cut, not refused
    const truncated = await post('/generate', { inputs: long, parameters: { max_new_tokens: 1, truncate: 10 } });
    expect(truncated.status).toBe(200);
  });
});
