import { afterEach, describe, expect, it, vi } from 'vitest';
import type { SoppuServer } from '../../src/server/create-server.js';
import { FakeEngine } from './fake-engine.js';
import { sseEvents, testServer } from './helpers.js';

let server: SoppuServer | null = null;
afterEach(async () => {
  await server?.app.close();
  server = null;
});

function setup(options: ConstructorParameters<typeof FakeEngine>[0] = {}) {
  const engine = new FakeEngine({ adapters: ['alice-1', 'bob-1'], failing: ['broken'], ...options });
  server = testServer(engine);
  return { engine, app: server.app };
}

describe('POST /generate', () => {
  it('without max_new_tokens, the default is what the request may have and the KV cache holds beside its prompt', async () => {
    const { engine, app } = setup();
    const tokens = engine.tokenize('hello').ids.length;
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hello' } });
    expect(engine.lastRequest?.maxNewTokens).toBe(engine.info.maxTotalTokens - tokens); // the server takes max_total_tokens from the engine
    (engine as { info: FakeEngine['info'] }).info = { ...engine.info, kvCapacityTokens: 40 };
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hello' } });
    expect(engine.lastRequest?.maxNewTokens).toBe(40 - tokens);
  });

  it('generates with the adapter and returns details and LoRAX headers', async () => {
    const { engine, app } = setup();
    const response = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hello', parameters: { adapter_id: 'alice-1', max_new_tokens: 5, details: true, seed: 7, return_k_alternatives: 1 } } });
    expect(response.statusCode).toBe(200);
    const body = response.json();
    expect(body.generated_text).toBe(engine.expectedText('hello', 'alice-1', 5));
    expect(body.details).toMatchObject({ finish_reason: 'length', prompt_tokens: 5, generated_tokens: 5, seed: 7, skipped_tokens: 0 });
    expect(body.details.tokens).toHaveLength(5);
    expect(body.details.tokens[0]).toMatchObject({ logprob: -0.5, special: false, skipped: false, alternative_tokens: [{ id: 1, text: 'z', logprob: -3 }] });
    expect(response.headers['x-adapter-id']).toBe('alice-1');
    expect(response.headers['x-generated-tokens']).toBe('5');
    expect(response.headers['x-model-id']).toBe('fake/tiny');
    // timing headers are whole milliseconds, x-compute-time too (TGI sends total_time.as_millis())
    for (const name of ['x-compute-time', 'x-total-time', 'x-inference-time', 'x-queue-time']) expect(String(response.headers[name]), name).toMatch(/^\d+$/);
    expect(response.headers['x-compute-time']).toBe(response.headers['x-total-time']);
    expect(engine.lastRequest?.sampling?.seed).toBe(7);
  });

  it('defaults: base model, no details, max_new_tokens = max_total − input', async () => {
    const { engine, app } = setup();
    const response = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'abcd' } });
    expect(response.statusCode).toBe(200);
    expect(response.json().details).toBeUndefined();
    expect(engine.lastRequest?.maxNewTokens).toBe(96 - 4);
    expect(engine.lastRequest?.adapterId).toBeNull();
    expect(response.headers['x-adapter-id']).toBeUndefined();
  });

  it('translates every parameter to the engine request', async () => {
    const { engine, app } = setup();
    const parameters = {
      adapter_id: 'bob-1', adapter_source: 'BANK', max_new_tokens: 3, temperature: 0.5, top_k: 4, top_p: 0.9, typical_p: 0.5,
      repetition_penalty: 1.1, frequency_penalty: 0.2, presence_penalty: -0.2, do_sample: true, seed: 3, stop: ['x'],
      truncate: 2, ignore_eos_token: true, decoder_input_details: true,
    };
    const response = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hello', parameters } });
    expect(response.statusCode).toBe(200);
    expect(engine.lastRequest).toMatchObject({
      adapterId: 'bob-1', adapterSource: 'bank', maxNewTokens: 3, stop: ['x'], truncate: 2, ignoreEos: true, prefillDetails: true,
      sampling: { temperature: 0.5, topK: 4, topP: 0.9, typicalP: 0.5, repetitionPenalty: 1.1, frequencyPenalty: 0.2, presencePenalty: -0.2, doSample: true, seed: 3 },
    });
    expect(response.json().details.prefill).toHaveLength(5);
    expect(response.json().details.prompt_tokens).toBe(2);
  });

  it('return_full_text prepends the prompt; a stop sequence ends with stop_sequence and stays in generated_text, as in LoRAX/TGI', async () => {
    const { engine, app } = setup();
    const text = engine.expectedText('hi', null, 20);
    const stop = text.slice(3, 5);
    const response = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { max_new_tokens: 20, stop: [stop], return_full_text: true, details: true } } });
    const body = response.json();
    expect(body.generated_text.startsWith('hi')).toBe(true);
    expect(body.details.finish_reason).toBe('stop_sequence');
    expect(body.generated_text).toBe(`hi${text.slice(0, text.indexOf(stop) + stop.length)}`);
    expect(body.generated_text).toBe(`hi${body.details.tokens.map((t: { text: string }) => t.text).join('')}`);
    const stream = await app.inject({ method: 'POST', url: '/generate_stream', payload: { inputs: 'hi', parameters: { max_new_tokens: 20, stop: [stop] } } });
    const events = stream.body.split('\n').filter((line) => line.startsWith('data:')).map((line) => JSON.parse(line.slice(5)) as { generated_text: string | null });
    expect(events.at(-1)!.generated_text).toBe(text.slice(0, text.indexOf(stop) + stop.length));
  });

  it('a request that makes its max_new_tokens finishes with length, as LoRAX reports it, even when its last token was eos or completed a stop', async () => {
    const { engine, app } = setup({ eosAfter: 3 });
    const ask = async (parameters: Record<string, unknown>) => (await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'hi', parameters: { details: true, ...parameters } } })).json().details.finish_reason;
    expect(await ask({ max_new_tokens: 4 })).toBe('length'); // eos as the 4th token
    expect(await ask({ max_new_tokens: 5 })).toBe('eos_token');
    const text = engine.expectedText('hi', null, 3);
    expect(await ask({ max_new_tokens: 3, stop: [text.slice(1, 3)] })).toBe('length'); // the stop completed by the 3rd token
    expect(await ask({ max_new_tokens: 3, stop: [text.slice(0, 2)] })).toBe('stop_sequence');
    const stream = await app.inject({ method: 'POST', url: '/generate_stream', payload: { inputs: 'hi', parameters: { max_new_tokens: 4, details: true } } });
    const events = stream.body.split('\n').filter((line) => line.startsWith('data:')).map((line) => JSON.parse(line.slice(5)) as { details: { finish_reason: string } | null });
    expect(events.at(-1)!.details!.finish_reason).toBe('length');
  });

  const invalid: [string, Record<string, unknown>, string][] = [
    ['empty inputs', { inputs: '' }, 'inputs'],
    ['missing inputs', { parameters: {} }, 'inputs'],
    ['temperature < 0', { inputs: 'a', parameters: { temperature: -1 } }, 'temperature'],
    ['temperature = 0 (LoRAX: strictly positive)', { inputs: 'a', parameters: { temperature: 0 } }, 'temperature'],
    ['top_p = 1 (LoRAX: below 1)', { inputs: 'a', parameters: { top_p: 1 } }, 'top_p'],
    ['top_k = 0', { inputs: 'a', parameters: { top_k: 0 } }, 'top_k'],
    ['top_p = 0', { inputs: 'a', parameters: { top_p: 0 } }, 'top_p'],
    ['top_p > 1', { inputs: 'a', parameters: { top_p: 1.5 } }, 'top_p'],
    ['typical_p = 1', { inputs: 'a', parameters: { typical_p: 1 } }, 'typical_p'],
    ['repetition_penalty = 0', { inputs: 'a', parameters: { repetition_penalty: 0 } }, 'repetition_penalty'],
    ['frequency_penalty > 2', { inputs: 'a', parameters: { frequency_penalty: 2.5 } }, 'frequency_penalty'],
    ['presence_penalty < -2', { inputs: 'a', parameters: { presence_penalty: -3 } }, 'presence_penalty'],
    ['max_new_tokens = 0', { inputs: 'a', parameters: { max_new_tokens: 0 } }, 'max_new_tokens'],
    ['max_new_tokens float', { inputs: 'a', parameters: { max_new_tokens: 1.5 } }, 'max_new_tokens'],
    ['max_new_tokens string', { inputs: 'a', parameters: { max_new_tokens: '3' } }, 'max_new_tokens'],
    ['seed < 0', { inputs: 'a', parameters: { seed: -1 } }, 'seed'],
    ['too many stop sequences', { inputs: 'a', parameters: { stop: ['a', 'b', 'c', 'd', 'e'] } }, 'stop'],
    ['truncate = 0', { inputs: 'a', parameters: { truncate: 0 } }, 'truncate'],
    ['return_k_alternatives = 0', { inputs: 'a', parameters: { return_k_alternatives: 0 } }, 'return_k_alternatives'],
    ['best_of = 2', { inputs: 'a', parameters: { best_of: 2 } }, 'best_of'],
    ['unknown adapter_source', { inputs: 'a', parameters: { adapter_source: 'ftp' } }, 'adapter_source'],
    ['hub adapter_source', { inputs: 'a', parameters: { adapter_source: 'hub' } }, "'hub' is not supported"],
    ['s3 adapter_source', { inputs: 'a', parameters: { adapter_source: 'S3' } }, "'s3' is not supported"],
    ['pbase adapter_source', { inputs: 'a', parameters: { adapter_source: 'pbase' } }, "'pbase' is not supported"],
    ['merged_adapters', { inputs: 'a', parameters: { merged_adapters: { ids: ['a'], weights: [1] } } }, 'merged_adapters'],
    ['apply_chat_template (accepted before, and ignored)', { inputs: 'a', parameters: { apply_chat_template: true } }, 'apply_chat_template'],
    ['unknown response_format type', { inputs: 'a', parameters: { response_format: { type: 'yaml' } } }, 'response_format'],
    ['json response_format', { inputs: 'a', parameters: { response_format: { type: 'json_object' } } }, 'response_format'],
    ['watermark', { inputs: 'a', parameters: { watermark: true } }, 'watermark'],
    ['input + max_new_tokens > max_total', { inputs: 'abc', parameters: { max_new_tokens: 94 } }, 'must be <= 96'],
    ['input longer than max_input', { inputs: 'a'.repeat(65) }, 'less than 64 tokens'],
    ['details not boolean', { inputs: 'a', parameters: { details: 'yes' } }, 'details'],
  ];
  for (const [name, payload, fragment] of invalid) {
    it(`422 for ${name}`, async () => {
      const { app } = setup();
      const response = await app.inject({ method: 'POST', url: '/generate', payload });
      expect(response.statusCode).toBe(422);
      const body = response.json();
      expect(body.error_type).toBe('validation');
      expect(body.error).toMatch(/^Input validation error: /);
      expect(body.error).toContain(fragment);
    });
  }

  it('422 for malformed JSON, in the error shape', async () => {
    const { app } = setup();
    const response = await app.inject({ method: 'POST', url: '/generate', payload: '{"inputs":', headers: { 'content-type': 'application/json' } });
    expect(response.statusCode).toBe(422);
    expect(response.json().error_type).toBe('validation');
  });

  it('404 for an unknown adapter, 424 naming the file for a corrupt one', async () => {
    const { app } = setup();
    const missing = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { adapter_id: 'nope' } } });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toEqual({ error: "Adapter 'nope' not found", error_type: 'not_found' });
    const broken = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { adapter_id: 'broken' } } });
    expect(broken.statusCode).toBe(424);
    expect(broken.json().error_type).toBe('generation');
    expect(broken.json().error).toMatch(/^Request failed during generation: .*adapter_model\.safetensors.*expected \[4, 16\]/);
  });
});

describe('POST /generate_stream and compat POST /', () => {
  it('streams one data: event per token, the last with generated_text and details', async () => {
    const { engine, app } = setup();
    const response = await app.inject({ method: 'POST', url: '/generate_stream', payload: { inputs: 'hey', parameters: { adapter_id: 'alice-1', max_new_tokens: 4, details: true } } });
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toBe('text/event-stream');
    expect(response.body.startsWith('data:{')).toBe(true);
    const events = sseEvents(response.body) as Record<string, any>[];
    expect(events).toHaveLength(4);
    expect(events.slice(0, 3).every((e) => e.generated_text === null && e.details === null)).toBe(true);
    const text = engine.expectedText('hey', 'alice-1', 4);
    expect(events.map((e) => e.token.text).join('')).toBe(text);
    expect(events[3]).toMatchObject({ generated_text: text, details: { finish_reason: 'length', prompt_tokens: 3, generated_tokens: 4 } });
  });

  it('errors before the first token are real HTTP errors, not 200 streams', async () => {
    const { app } = setup();
    const broken = await app.inject({ method: 'POST', url: '/generate_stream', payload: { inputs: 'a', parameters: { adapter_id: 'broken' } } });
    expect(broken.statusCode).toBe(424);
    const invalid = await app.inject({ method: 'POST', url: '/generate_stream', payload: { inputs: 'a', parameters: { decoder_input_details: true } } });
    expect(invalid.statusCode).toBe(422);
    expect(invalid.json().error).toContain('decoder_input_details');
  });

  it('compat route: array for non-stream, SSE for stream; /invocations alias; the full text unless return_full_text is false', async () => {
    const { engine, app } = setup();
    // LoRAX takes the compat routes' return_full_text from the pipeline tag: text-generation returns the prompt too
    const plain = await app.inject({ method: 'POST', url: '/', payload: { inputs: 'abc', parameters: { max_new_tokens: 2 } } });
    expect(plain.json()).toEqual([{ generated_text: 'abc' + engine.expectedText('abc', null, 2) }]);
    const answerOnly = await app.inject({ method: 'POST', url: '/', payload: { inputs: 'abc', parameters: { max_new_tokens: 2, return_full_text: false } } });
    expect(answerOnly.json()).toEqual([{ generated_text: engine.expectedText('abc', null, 2) }]);
    const streamed = await app.inject({ method: 'POST', url: '/invocations', payload: { inputs: 'abc', stream: true, parameters: { max_new_tokens: 2 } } });
    const events = sseEvents(streamed.body) as Record<string, any>[];
    expect(events.at(-1)?.generated_text).toBe('abc' + engine.expectedText('abc', null, 2));
    const generate = await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'abc', parameters: { max_new_tokens: 2 } } });
    expect(generate.json().generated_text).toBe(engine.expectedText('abc', null, 2)); // /generate: false by default
  });
});

describe('auxiliary routes', () => {
  it('GET /health, /info, /tokenize, unknown route', async () => {
    const { app } = setup();
    expect((await app.inject({ method: 'GET', url: '/health' })).statusCode).toBe(200);
    const info = (await app.inject({ method: 'GET', url: '/info' })).json();
    expect(info).toMatchObject({ model_id: 'fake/tiny', max_input_length: 64, max_total_tokens: 96, max_stop_sequences: 4, max_best_of: 1, model_device_type: 'cpu' });
    expect(info).toMatchObject({ model_dtype: 'f32', lora_dtype: 'f32', bank_dtype: 'bf16' });
    // LoRAX's Info fields that typed clients read as numbers
    for (const field of ['waiting_served_ratio', 'max_waiting_tokens', 'max_batch_total_tokens', 'max_concurrent_requests']) expect(typeof info[field], field).toBe('number');
    const tokens = (await app.inject({ method: 'POST', url: '/tokenize', payload: { inputs: 'ab' } })).json();
    expect(tokens).toEqual([{ id: 97, text: 'a', start: 0, stop: 1 }, { id: 98, text: 'b', start: 1, stop: 2 }]);
    const missing = await app.inject({ method: 'GET', url: '/nope' });
    expect(missing.statusCode).toBe(404);
    expect(missing.json()).toEqual({ error: 'Input validation error: No route GET /nope', error_type: 'validation' });
  });

  it('GET /metrics exposes LoRAX counters and per-adapter residency', async () => {
    const { app } = setup();
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { max_new_tokens: 2 } } });
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { top_k: 0 } } });
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { adapter_id: 'broken' } } });
    const text = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(text).toMatch(/^lorax_request_count 3$/m);
    expect(text).toMatch(/^lorax_request_success 1$/m);
    expect(text).toMatch(/^lorax_request_failure\{err="validation"\} 1$/m);
    expect(text).toMatch(/^lorax_request_failure\{err="load_adapter"\} 1$/m);
    expect(text).toMatch(/^lorax_request_generated_tokens_sum 2$/m);
    expect(text).toContain('lorax_request_duration_bucket');
    expect(text).toContain('lorax_request_mean_time_per_token_duration_count 1');
    // per adapter only what is in memory or pinned (a bank of thousands on disk is counted, not listed)
    expect(text).toMatch(/^soppu_adapters\{tier="disk"\} 3$/m);
    expect(text).not.toMatch(/^soppu_adapter_(resident|bytes|pinned)\{/m);
    await server!.context.engine.pinAdapter('alice-1', true); // the fake engine makes it resident
    const pinned = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(pinned).toMatch(/^soppu_adapter_resident\{adapter_id="alice-1",storage="compressed"\} 1$/m);
    expect(pinned).toMatch(/^soppu_adapter_pinned\{adapter_id="alice-1"\} 1$/m);
    expect(pinned).toMatch(/^soppu_adapter_bytes\{adapter_id="alice-1"\} \d+$/m);
    expect(pinned).toMatch(/^soppu_adapters\{tier="resident"\} 1$/m);
    expect(pinned).not.toMatch(/adapter_id="bob-1"/);
    // the adapter gauges share one listing per scrape (a bank lists thousands), and the next scrape lists again
    const listings = vi.spyOn(server!.context.engine, 'listAdapters');
    await app.inject({ method: 'GET', url: '/metrics' });
    expect(listings).toHaveBeenCalledTimes(1);
    await server!.context.engine.pinAdapter('alice-1', false);
    expect((await app.inject({ method: 'GET', url: '/metrics' })).body).not.toMatch(/^soppu_adapter_pinned\{/m);
    expect(listings).toHaveBeenCalledTimes(2);
    listings.mockRestore();
    // a one-token reply has no time between tokens: not observed
    await app.inject({ method: 'POST', url: '/generate', payload: { inputs: 'a', parameters: { max_new_tokens: 1 } } });
    expect((await app.inject({ method: 'GET', url: '/metrics' })).body).toContain('lorax_request_mean_time_per_token_duration_count 1');
    expect(text).toContain('soppu_generated_tokens 2');
    expect(text).toContain('lorax_queue_length 0');
    // tokens/s is over a trailing window: a second scrape right after the first does not read 0
    const tokensPerSecond = (body: string) => Number(/^soppu_tokens_per_second (\S+)$/m.exec(body)?.[1]);
    expect(tokensPerSecond(text)).toBeGreaterThan(0);
    expect(tokensPerSecond((await app.inject({ method: 'GET', url: '/metrics' })).body)).toBeGreaterThan(0);
  });
});
