import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { Engine } from '../../src/engine/engine-types.js';
import { AccessControl } from '../../src/server/access-control.js';
import { createServer, type SoppuServer } from '../../src/server/create-server.js';
import { DEFAULT_SERVER_OPTIONS, type ServerOptions } from '../../src/server/server-options.js';

export const KEYS = {
  admin: 'sk-admin-000000',
  alice: 'sk-alice-000000',
  bob: 'sk-bob-00000000',
};

export function keysJson(): Record<string, unknown> {
  return {
    [KEYS.admin]: { role: 'admin', adapters: [] },
    [KEYS.alice]: { role: 'user', adapters: ['alice-*'] },
    [KEYS.bob]: { role: 'user', adapters: ['bob-1'] },
  };
}

export function testServer(engine: Engine, overrides: Partial<ServerOptions> & { auth?: boolean } = {}): SoppuServer {
  const root = mkdtempSync(path.join(tmpdir(), 'soppu-server-'));
  const { auth, ...rest } = overrides;
  return createServer(engine, {
    ...DEFAULT_SERVER_OPTIONS,
    maxInputTokens: 10_000,
    maxTotalTokens: 10_000,
    adapterDirs: [root],
    uploadDir: path.join(root, '.uploads'),
    accessControl: auth ? AccessControl.fromJson(keysJson(), 'keys.json') : null,
    ...rest,
  });
}

/** Parses an SSE body into the JSON of each `data:` event (and '[DONE]'). */
export function sseEvents(body: string): unknown[] {
  return body
    .split('\n\n')
    .map((block) => block.trim())
    .filter((block) => block.startsWith('data:'))
    .map((block) => {
      const data = block.slice(5).trim();
      return data === '[DONE]' ? '[DONE]' : JSON.parse(data);
    });
}
