import { describe, expect, it } from 'vitest';
import { SoppuError } from '../../src/errors/soppu-error.js';
import { errorResponse } from '../../src/server/error-response.js';
import { FakeEngine } from './fake-engine.js';
import { testServer } from './helpers.js';

describe('errorResponse', () => {
  it('prefixes a 424 with LoRAX\'s "Request failed during generation" on generation routes only', () => {
    const corrupt = new SoppuError('BANK_CORRUPT', 'bank/manifest.json: not valid JSON');
    expect(errorResponse(corrupt, '/generate').body).toEqual({ error: 'Request failed during generation: bank/manifest.json: not valid JSON', error_type: 'generation' });
    for (const url of ['/bank/reload', '/adapters', '/adapters/x', '/adapters?id=x', '/keys/reload']) {
      expect(errorResponse(corrupt, url, true).body, url).toEqual({ error: 'bank/manifest.json: not valid JSON', error_type: 'generation' });
    }
  });

  it('takes an admin route from its route config: a bank reload that fails is no generation\'s', async () => {
    const engine = new FakeEngine();
    engine.reloadBank = async () => {
      throw new SoppuError('BANK_CORRUPT', 'bank/manifest.json: not valid JSON');
    };
    const response = await testServer(engine).app.inject({ method: 'POST', url: '/bank/reload' });
    expect(response.statusCode).toBe(424);
    expect(response.json()).toEqual({ error: 'bank/manifest.json: not valid JSON', error_type: 'generation' });
  });

  it('names the fields in an OpenAI error message as the OpenAI request does', () => {
    const budget = new SoppuError('VALIDATION', 'Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. Given: 5 `inputs` tokens and 2048 `max_new_tokens`', { field: 'max_new_tokens' });
    const chat = errorResponse(budget, '/v1/chat/completions');
    expect(chat.status).toBe(400);
    expect(chat.body).toMatchObject({ error: { message: 'Input validation error: `messages` tokens + `max_tokens` must be <= 2048. Given: 5 `messages` tokens and 2048 `max_tokens`', param: 'max_tokens' } });
    expect(errorResponse(budget, '/v1/completions').body).toMatchObject({ error: { message: expect.stringMatching(/^Input validation error: `prompt` tokens \+ `max_tokens`/) } });
    expect(errorResponse(budget, '/generate').body).toMatchObject({ error: budget.message });
  });
});
