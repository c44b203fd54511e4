import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SoppuServer } from '../../src/server/create-server.js';
import { FakeEngine } from './fake-engine.js';
import { KEYS, testServer } from './helpers.js';

const engine = new FakeEngine({ adapters: ['alice-1', 'bob-1'], failing: ['alice-broken'], eosAfter: 8 });
let server: SoppuServer;
let client: OpenAI;

beforeAll(async () => {
  server = testServer(engine, { auth: true });
  await server.app.listen({ port: 0, host: '127.0.0.1' });
  const address = server.app.server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  client = new OpenAI({ baseURL: `http://127.0.0.1:${address.port}/v1`, apiKey: KEYS.alice, maxRetries: 0 });
});
afterAll(async () => {
  await server.app.close();
});

describe('OpenAI-compatible routes with the official client', () => {
  it('completions: model = adapter id, usage, finish_reason length', async () => {
    const completion = await client.completions.create({ model: 'alice-1', prompt: 'hello', max_tokens: 5, temperature: 0 });
    expect(completion.choices[0]!.text).toBe(engine.expectedText('hello', 'alice-1', 5));
    expect(completion.choices[0]!.finish_reason).toBe('length');
    expect(completion.usage).toEqual({ prompt_tokens: 5, completion_tokens: 5, total_tokens: 10 });
    expect(completion.object).toBe('text_completion');
    expect(engine.lastRequest?.sampling?.doSample).toBe(false);
  });

  it('completions logprobs list the eos that ended the text (a loglikelihood client counts every generated token); chat leaves it out', async () => {
    const ended = await client.completions.create({ model: 'alice-1', prompt: 'hello', max_tokens: 20, logprobs: 1, temperature: 0 });
    expect(ended.choices[0]!.finish_reason).toBe('stop');
    const lp = ended.choices[0]!.logprobs!;
    expect(lp.tokens).toHaveLength(ended.usage!.completion_tokens);
    expect(lp.text_offset!.at(-1)).toBe(ended.choices[0]!.text.length); // it stands at the text's end
    expect(lp.tokens!.slice(0, -1).join('')).toBe(ended.choices[0]!.text);
    const chat = await client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'hello' }], max_tokens: 20, logprobs: true, temperature: 0 });
    expect(chat.choices[0]!.logprobs!.content).toHaveLength(chat.usage!.completion_tokens - 1);
  });

  it('finish_reason is "stop" for eos and for stop sequences (not content_filter)', async () => {
    const eos = await client.completions.create({ model: 'fake/tiny', prompt: 'hi', max_tokens: 20, temperature: 0 });
    expect(eos.choices[0]!.finish_reason).toBe('stop');
    expect(engine.lastRequest?.adapterId).toBeNull();
    const text = engine.expectedText('hi', 'alice-1', 8);
    const stop = text.slice(2, 4);
    const stopped = await client.completions.create({ model: 'alice-1', prompt: 'hi', max_tokens: 8, stop: [stop], temperature: 0 });
    expect(stopped.choices[0]!.finish_reason).toBe('stop');
    expect(stopped.choices[0]!.text).toBe(text.slice(0, text.indexOf(stop)));
  });

  it('chat completions, plain and streamed; the stream ends with [DONE] and carries usage when asked', async () => {
    const messages = [{ role: 'user' as const, content: 'hey' }];
    const prompt = engine.applyChatTemplate(messages);
    const chat = await client.chat.completions.create({ model: 'alice-1', messages, max_tokens: 6, temperature: 0 });
    expect(chat.choices[0]!.message).toMatchObject({ role: 'assistant', content: engine.expectedText(prompt, 'alice-1', 6) });
    expect(chat.choices[0]!.finish_reason).toBe('length');
    const text = engine.expectedText(prompt, 'alice-1', 8);
    const stop = text.slice(3, 6);
    const stream = await client.chat.completions.create({ model: 'alice-1', messages, max_tokens: 8, temperature: 0, stop: [stop], stream: true, stream_options: { include_usage: true } });
    let content = '';
    let finish: string | null = null;
    let usage: unknown = null;
    for await (const chunk of stream) {
      content += chunk.choices[0]?.delta.content ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
      expect(chunk.object).toBe('chat.completion.chunk');
    }
    expect(content).toBe(text.slice(0, text.indexOf(stop)));
    expect(finish).toBe('stop');
    expect(usage).toMatchObject({ prompt_tokens: prompt.length });
  });

  it('completions stream over the socket ends with data: [DONE]', async () => {
    const address = server.app.server.address() as { port: number };
    const response = await fetch(`http://127.0.0.1:${address.port}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${KEYS.alice}` },
      body: JSON.stringify({ model: 'alice-1', prompt: 'abc', max_tokens: 3, stream: true, temperature: 0, stream_options: { include_usage: true } }),
    });
    const body = await response.text();
    expect(body.trim().endsWith('data: [DONE]')).toBe(true);
    const chunks = body.split('\n\n').filter((b) => b.startsWith('data: {')).map((b) => JSON.parse(b.slice(6)));
    expect(chunks.slice(0, -1).map((c) => c.choices[0].text).join('')).toBe(engine.expectedText('abc', 'alice-1', 3));
    expect(chunks.at(-1).choices).toEqual([]);
    expect(chunks.at(-1).usage.completion_tokens).toBe(3);
  });

  it('errors come in the OpenAI shape: 404 for other users\' adapters, 424 for corrupt, 400 for invalid requests (BadRequestError, param a field name), 401', async () => {
    await expect(client.completions.create({ model: 'bob-1', prompt: 'x', max_tokens: 1 })).rejects.toMatchObject({ status: 404, error: { message: "Adapter 'bob-1' not found", code: 'adapter_not_found', param: 'model' } });
    await expect(client.completions.create({ model: 'alice-broken', prompt: 'x', max_tokens: 1 })).rejects.toMatchObject({ status: 424 });
    await expect(client.completions.create({ model: 'alice-1', prompt: 'x', max_tokens: 1, temperature: 3 })).rejects.toMatchObject({ status: 400, error: { type: 'invalid_request_error', param: 'temperature' } });
    await expect(client.completions.create({ model: 'alice-1', prompt: 'x', max_tokens: 1, temperature: 3 })).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expect(client.completions.create({ model: 'alice-1', prompt: 'x', n: 17 })).rejects.toMatchObject({ status: 400, error: { param: 'n' } });
    await expect(client.completions.create({ model: 'alice-1', prompt: ['a', 'b', 'c'], n: 6 })).rejects.toMatchObject({ status: 400, error: { param: 'n' } });
    await expect(client.completions.create({ model: 'alice-1', prompt: 'x', n: 2, stream: true })).rejects.toMatchObject({ status: 400, error: { param: 'n' } });
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'x' }], stream_options: { include_usage: true } })).rejects.toMatchObject({ status: 400, error: { param: 'stream_options' } });
    const anonymous = new OpenAI({ baseURL: client.baseURL, apiKey: 'sk-nobody-000', maxRetries: 0 });
    await expect(anonymous.models.list()).rejects.toMatchObject({ status: 401 });
  });

  it('GET /v1/models lists the base model and this caller\'s adapters with status', async () => {
    const models = [];
    for await (const model of client.models.list()) models.push(model);
    expect(models.map((m) => m.id)).toEqual(['fake/tiny', 'alice-1', 'alice-broken']);
    expect(models[1]).toMatchObject({ parent: 'fake/tiny', status: { tier: 'disk', storage: 'compressed', pinned: false } });
  });
});

describe('OpenAI details a client relies on', () => {
  it("models.retrieve gives the base model and the caller's adapters; other ids and unknown /v1 routes are 404 (NotFoundError)", async () => {
    expect(await client.models.retrieve('alice-1')).toMatchObject({ id: 'alice-1', object: 'model', parent: 'fake/tiny', status: { storage: 'compressed' } });
    expect(await client.models.retrieve('fake/tiny')).toMatchObject({ id: 'fake/tiny', parent: null });
    await expect(client.models.retrieve('bob-1')).rejects.toMatchObject({ status: 404, error: { code: 'adapter_not_found' } });
    await expect(client.embeddings.create({ model: 'alice-1', input: 'x' })).rejects.toMatchObject({ status: 404 });
  });

  it('completions default to 16 new tokens (chat to what the context leaves); OpenAI nullable fields take null', async () => {
    await client.completions.create({ model: 'alice-1', prompt: 'hello', temperature: 0 });
    expect(engine.lastRequest?.maxNewTokens).toBe(16);
    await client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'hi' }], temperature: 0 });
    expect(engine.lastRequest?.maxNewTokens).toBeGreaterThan(16);
    const nulls = { stream: null, echo: null, ignore_eos_token: null, logit_bias: null, suffix: null } as never;
    await expect(client.completions.create({ model: 'alice-1', prompt: 'hello', max_tokens: 2, ...(nulls as object) })).resolves.toMatchObject({ object: 'text_completion' });
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, stream: null, tools: null } as never)).resolves.toMatchObject({ object: 'chat.completion' });
  });

  it('refuses logit_bias and suffix (400 naming them) rather than ignoring them; a developer message is given to the template as system', async () => {
    await expect(client.completions.create({ model: 'alice-1', prompt: 'hello', max_tokens: 2, logit_bias: { '5': -100 } })).rejects.toMatchObject({ status: 400, error: { param: 'logit_bias' } });
    await expect(client.completions.create({ model: 'alice-1', prompt: 'hello', max_tokens: 2, suffix: 'end' })).rejects.toMatchObject({ status: 400, error: { param: 'suffix' } });
    await client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'developer', content: 'be brief' }, { role: 'user', content: 'hi' }], max_tokens: 2 });
    expect(engine.lastChat?.[0]).toEqual({ role: 'system', content: 'be brief' });
    const call = { id: 'abcDEF123', type: 'function' as const, function: { name: 'f', arguments: '{}' } };
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: null, tool_calls: [call] }, { role: 'user', content: 'y' }], max_tokens: 2 }))
      .rejects.toMatchObject({ status: 400, error: { param: 'messages[1].tool_calls' } });
    // tool messages: tools are refused, so are their results
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'tool', content: 'r', tool_call_id: 'c' }], max_tokens: 2 })).rejects.toMatchObject({ status: 400 });
  });
});

describe('several choices', () => {
  it('past max_concurrent_requests the whole request is a 429 and no choice keeps running', async () => {
    const small = testServer(new FakeEngine({ adapters: ['alice-1'] }), { maxConcurrentRequests: 2 });
    try {
      const refused = await small.app.inject({ method: 'POST', url: '/v1/completions', payload: { model: 'alice-1', prompt: 'hi', n: 3, max_tokens: 2 } });
      expect(refused.statusCode).toBe(429);
      expect(small.context.service.running).toBe(0);
      const fits = await small.app.inject({ method: 'POST', url: '/v1/completions', payload: { model: 'alice-1', prompt: ['hi', 'yo'], max_tokens: 2 } });
      expect(fits.statusCode).toBe(200);
      expect(fits.json().choices).toHaveLength(2);
      expect(small.context.service.running).toBe(0);
    } finally {
      await small.app.close();
    }
  });
});

describe('OpenAI validation and keys file', () => {
  it('refuses image parts, tools and JSON response_format with 400 in the OpenAI shape', async () => {
    const image = [{ role: 'user' as const, content: [{ type: 'image_url' as const, image_url: { url: 'http://x/y.png' } }] }];
    await expect(client.chat.completions.create({ model: 'alice-1', messages: image, max_tokens: 1 })).rejects.toMatchObject({ status: 400, error: { param: 'messages[0].content' } });
    const tools = [{ type: 'function' as const, function: { name: 'f', parameters: {} } }];
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'x' }], tools })).rejects.toMatchObject({ status: 400 });
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [{ role: 'user', content: 'x' }], response_format: { type: 'json_object' } })).rejects.toMatchObject({ status: 400 });
    await expect(client.chat.completions.create({ model: 'alice-1', messages: [] })).rejects.toMatchObject({ status: 400, error: { param: 'messages' } });
    // more messages than max_input_tokens could never fit: refused by the schema, before any templating
    const many = Array.from({ length: 10_001 }, () => ({ role: 'user' as const, content: 'x' }));
    const template = engine.applyChatTemplate.bind(engine);
    let templated = 0;
    engine.applyChatTemplate = (messages: readonly { role: string; content: string }[]) => (templated++, template(messages));
    try {
      await expect(client.chat.completions.create({ model: 'alice-1', messages: many, max_tokens: 1 })).rejects.toMatchObject({ status: 400, error: { param: 'messages' } });
      expect(templated).toBe(0);
    } finally {
      engine.applyChatTemplate = template;
    }
  });

  it('a message without content is a 400 naming it (a 500 before); an assistant turn may go without', async () => {
    const missing = [{ role: 'user' }] as unknown as OpenAI.ChatCompletionMessageParam[];
    await expect(client.chat.completions.create({ model: 'alice-1', messages: missing, max_tokens: 1 })).rejects.toMatchObject({ status: 400, error: { param: 'messages[0].content', message: 'Input validation error: Missing required parameter: `messages[0].content`' } });
    const assistant = [{ role: 'user', content: 'hi' }, { role: 'assistant' }, { role: 'user', content: 'again' }] as unknown as OpenAI.ChatCompletionMessageParam[];
    const answer = await client.chat.completions.create({ model: 'alice-1', messages: assistant, max_tokens: 2 });
    expect(answer.choices[0]!.finish_reason).toBe('length');
  });

  it('a token budget error names max_tokens, as the OpenAI request calls it', async () => {
    await expect(client.completions.create({ model: 'alice-1', prompt: 'hello world', max_tokens: 95 })).rejects.toMatchObject({ status: 400, error: { param: 'max_tokens', message: expect.stringContaining('`prompt` tokens + `max_tokens` must be <= 96') } });
  });

  it('a malformed keys file is a CONFIG error naming the file and entry, never the key', async () => {
    const { AccessControl } = await import('../../src/server/access-control.js');
    expect(() => AccessControl.fromJson({ 'sk-secret-123': { role: 'root' } }, 'keys.json')).toThrow(/keys\.json: entry #1: role must be "admin" or "user"/);
    expect(() => AccessControl.fromJson({ short: { role: 'user' } }, 'keys.json')).toThrow(/at least 8 characters/);
    expect(() => AccessControl.fromJson({ 'sk-secret-123': { role: 'user', adapters: [1] } }, 'keys.json')).toThrow(/adapters must be an array/);
    try {
      AccessControl.fromJson({ 'sk-secret-123': { role: 'root' } }, 'keys.json');
    } catch (e) {
      expect(String(e)).not.toContain('sk-secret-123');
    }
  });
});
