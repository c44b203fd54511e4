/**
 * `soppu serve` as a child process (the compiled CLI in dist/, built by `npm install` /
 * `npm run build:ts`): SIGTERM stops accepting, lets the running stream finish, and exits 0.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { sseEvents } from './helpers.js';

const CLI = path.resolve('dist/src/cli/main.js');
const built = existsSync(path.resolve('dist/src/cli/commands/serve.js'));

describe.skipIf(!built)('soppu serve (child process)', () => {
  it('SIGTERM drains: the running stream completes, new requests get 503 meanwhile, then the listener closes and the exit code is 0', async () => {
    const root = mkdtempSync(path.join(tmpdir(), 'soppu-serve-'));
    const model = await generateModel({ out: path.join(root, 'model'), shape: 'tiny', seed: 5 });
    const child = spawn(process.execPath, [CLI, 'serve', '--model', model.dir, '--port', '0', '--drain-deadline-s', '20', '--cache', path.join(root, 'cache')], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += String(d)));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const base = await new Promise<string>((resolve, reject) => {
      child.stdout.on('data', (d) => {
        stdout += String(d);
        const match = /listening on (http:\/\/\S+)/.exec(stdout);
        if (match?.[1]) resolve(match[1]);
      });
      void exited.then(() => reject(new Error(`serve exited early: ${stderr}`)));
    });
    const response = await fetch(`${base}/generate_stream`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ inputs: 'Hello there', parameters: { max_new_tokens: 400, ignore_eos_token: true, details: true } }),
    });
    expect(response.status).toBe(200);
    const reader = response.body!.getReader();
    const decoder = new TextDecoder();
    let body = decoder.decode((await reader.read()).value);
    child.kill('SIGTERM');
    while (!stderr.includes('SIGTERM: draining')) await new Promise((resolve) => setTimeout(resolve, 5));
    // the stream still runs: the server answers, with 503
    expect((await fetch(`${base}/health`)).status).toBe(503);
    const refused = await fetch(`${base}/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'hi' }) });
    expect(refused.status).toBe(503);
    for (;;) {
      const chunk = await reader.read();
      if (chunk.done) break;
      body += decoder.decode(chunk.value);
    }
    const events = sseEvents(body) as { generated_text: string | null; details: { generated_tokens: number } | null }[];
    expect(events.at(-1)?.details?.generated_tokens).toBe(400);
    expect(events.at(-1)?.generated_text).not.toBeNull();
    expect(await exited).toBe(0);
    expect(stderr).toContain('SIGTERM: draining');
    await expect(fetch(`${base}/health`)).rejects.toThrow();
  });
});
