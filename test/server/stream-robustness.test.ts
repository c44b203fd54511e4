/**
 * Responses whose head carries text Node refuses in a header (a local adapter folder or a model id
 * outside Latin-1) still answer, and a response that fails after the engine started still frees its
 * admission slot and closes the generation.
 */
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import type { InjectOptions } from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import type { SoppuServer } from '../../src/server/create-server.js';
import { abortOnDisconnect, headerValue } from '../../src/server/server-context.js';
import { EventEmitter } from 'node:events';
import type { FastifyReply } from 'fastify';
import { FakeEngine } from './fake-engine.js';
import { sseEvents, testServer } from './helpers.js';

let server: SoppuServer | null = null;
afterEach(async () => {
  await server?.app.close();
  server = null;
});

const FOLDER = 'adapter-日本';
const ENCODED = 'adapter-%E6%97%A5%E6%9C%AC';

/** `inject`, failing fast instead of hanging the suite when no response comes. */
async function injectWithin(app: SoppuServer['app'], options: InjectOptions, ms = 5000) {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no response within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([app.inject(options), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function localServer(engine: FakeEngine): SoppuServer {
  server = testServer(engine);
  mkdirSync(path.join(server.context.options.adapterDirs[0]!, FOLDER));
  return server;
}

const localBody = { inputs: 'hi', parameters: { adapter_id: FOLDER, adapter_source: 'local', max_new_tokens: 3 } };

describe('header values', () => {
  it('headerValue keeps printable ASCII and percent-encodes anything else', () => {
    expect(headerValue('alice-1')).toBe('alice-1');
    expect(headerValue('org/name with space_%~')).toBe('org/name with space_%~');
    expect(headerValue(FOLDER)).toBe(ENCODED);
    expect(headerValue('café')).toBe('caf%C3%A9');
    expect(headerValue('a\r\nb')).toBe('a%0D%0Ab');
    expect(headerValue('x\ud800')).toBe('x%EF%BF%BD');
    expect(decodeURIComponent(headerValue(FOLDER))).toBe(FOLDER);
  });

  it('/generate_stream with a non-Latin-1 local adapter folder streams, with the id percent-encoded', async () => {
    const engine = new FakeEngine();
    const { app, context } = localServer(engine);
    const response = await injectWithin(app, { method: 'POST', url: '/generate_stream', payload: localBody });
    expect(response.statusCode).toBe(200);
    expect(response.headers['x-adapter-id']).toBe(ENCODED);
    expect(response.headers['x-adapter-source']).toBe('local');
    const events = sseEvents(response.body) as { token: { text: string }; generated_text: string | null }[];
    expect(events).toHaveLength(3);
    expect(events.at(-1)?.generated_text).toBe(engine.expectedText('hi', FOLDER, 3));
    expect(engine.lastRequest?.adapterPath).toBe(path.join(context.options.adapterDirs[0]!, FOLDER));
    expect(context.service.running).toBe(0);
    expect(engine.running).toBe(0);
  });

  it('/generate with a non-Latin-1 local adapter folder answers 200 with the LoRAX body', async () => {
    const engine = new FakeEngine();
    const { app, context } = localServer(engine);
    const response = await injectWithin(app, { method: 'POST', url: '/generate', payload: localBody });
    expect(response.statusCode).toBe(200);
    expect(response.headers['x-adapter-id']).toBe(ENCODED);
    expect(response.json()).toEqual({ generated_text: engine.expectedText('hi', FOLDER, 3) });
    expect(context.service.running).toBe(0);
  });

  it('a non-Latin-1 model id is percent-encoded on LoRAX and OpenAI streams alike', async () => {
    const engine = new FakeEngine();
    (engine as { info: FakeEngine['info'] }).info = { ...engine.info, modelId: 'モデル' };
    server = testServer(engine);
    const encoded = encodeURIComponent('モデル');
    const lorax = await injectWithin(server.app, { method: 'POST', url: '/generate_stream', payload: { inputs: 'hi', parameters: { max_new_tokens: 2 } } });
    expect(lorax.statusCode).toBe(200);
    expect(lorax.headers['x-model-id']).toBe(encoded);
    const chat = await injectWithin(server.app, { method: 'POST', url: '/v1/chat/completions', payload: { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, stream: true } });
    expect(chat.statusCode).toBe(200);
    expect(chat.headers['x-model-id']).toBe(encoded);
    expect(sseEvents(chat.body).at(-1)).toBe('[DONE]');
    expect(server.context.service.running).toBe(0);
  });
});

describe('a response head that fails after the engine started', () => {
  for (const [url, payload, errorOf] of [
    ['/generate_stream', { inputs: 'hi', parameters: { max_new_tokens: 50 } }, (body: Record<string, unknown>) => body.error],
    ['/v1/completions', { prompt: 'hi', max_tokens: 50, stream: true }, (body: Record<string, unknown>) => (body.error as { message: string }).message],
  ] as const) {
    it(`${url}: answers 500 in its own error shape, frees the slot and closes the generation`, async () => {
      const engine = new FakeEngine({ tokenDelayMs: 5 });
      server = testServer(engine);
      // the SSE head is the first write of the response: make exactly that one throw
      server.app.addHook('onRequest', async (_request, reply) => {
        const writeHead = reply.raw.writeHead.bind(reply.raw);
        let calls = 0;
        reply.raw.writeHead = ((...args: Parameters<typeof writeHead>) => {
          calls += 1;
          if (calls === 1) throw new Error('head refused');
          return writeHead(...args);
        }) as typeof reply.raw.writeHead;
      });
      const response = await injectWithin(server.app, { method: 'POST', url, payload });
      expect(response.statusCode).toBe(500);
      expect(errorOf(response.json())).toBe('Internal error: head refused');
      expect(server.context.service.running).toBe(0);
      expect(engine.running).toBe(0);
      expect(engine.generated).toBeLessThan(50);
    });
  }
});

describe('abortOnDisconnect', () => {
  const replyWith = (socket: { destroyed: boolean } | null): { reply: FastifyReply; raw: EventEmitter & { writableFinished: boolean } } => {
    const raw = Object.assign(new EventEmitter(), { writableFinished: false });
    return { reply: { raw, request: { raw: { socket } } } as unknown as FastifyReply, raw };
  };

  it('aborts when the client leaves, and at once when it left before the handler ran', () => {
    const live = replyWith({ destroyed: false });
    const controller = abortOnDisconnect(live.reply);
    expect(controller.signal.aborted).toBe(false);
    live.raw.emit('close');
    expect(controller.signal.aborted).toBe(true);
    // 'close' fired before the listener existed: it never comes again
    expect(abortOnDisconnect(replyWith({ destroyed: true }).reply).signal.aborted).toBe(true);
    expect(abortOnDisconnect(replyWith(null).reply).signal.aborted).toBe(true);
  });
});
