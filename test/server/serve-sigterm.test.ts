/**
 * `soppu serve` as a child process (the compiled CLI in dist/, built by `npm install` /
 * `npm run build:ts`): SIGTERM stops accepting, lets the running stream finish, and exits 0; SIGHUP
 * reads the keys file again.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { sseEvents } from './helpers.js';

const CLI = path.resolve('dist/src/cli/main.js');
const built = existsSync(path.resolve('dist/src/cli/commands/serve.js'));

/** `soppu serve ARGS` as a child process; `base` resolves to its URL once it listens. */
function startServe(args: readonly string[]) {
  const child = spawn(process.execPath, [CLI, 'serve', '--port', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += String(d)));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const base = new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (d) => {
      stdout += String(d);
      const match = /listening on (http:\/\/\S+)/.exec(stdout);
      if (match?.[1]) resolve(match[1]);
    });
    void exited.then(() => reject(new Error(`serve exited early: ${stderr}`)));
  });
  /** Resolves once stderr holds `text`. */
  const logged = async (text: string): Promise<void> => {
    while (!stderr.includes(text)) await new Promise((resolve) => setTimeout(resolve, 5));
  };
  return { child, base, exited, stderr: () => stderr, logged };
}

describe.skipIf(!built)('soppu serve (child process)', () => {
  it('SIGTERM drains: the running stream completes, new requests get 503 meanwhile, then the listener closes and the exit code is 0', async () => {
    const root = mkdtempSync(path.join(tmpdir(), 'soppu-serve-'));
    const model = await generateModel({ out: path.join(root, 'model'), shape: 'tiny', seed: 5 });
    const { child, base: listening, exited, stderr, logged } = startServe(['--model', model.dir, '--drain-deadline-s', '20', '--cache', path.join(root, 'cache')]);
    const base = await listening;
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
    await logged('SIGTERM: draining');
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
    expect(stderr()).toContain('SIGTERM: draining');
    await expect(fetch(`${base}/health`)).rejects.toThrow();
  });

  it('SIGHUP reads the keys file again: an added key works at once, a broken edit keeps the keys loaded before, and the server keeps serving', async () => {
    const root = mkdtempSync(path.join(tmpdir(), 'soppu-serve-'));
    const model = await generateModel({ out: path.join(root, 'model'), shape: 'tiny', seed: 5 });
    const keys = path.join(root, 'keys.json');
    const admin = 'sk-admin-0123456789';
    const carol = 'sk-carol-0123456789';
    writeFileSync(keys, JSON.stringify({ [admin]: { role: 'admin' } }));
    const { child, base: listening, exited, logged } = startServe(['--model', model.dir, '--auth', keys, '--cache', path.join(root, 'cache')]);
    try {
      const base = await listening;
      const models = (key: string) => fetch(`${base}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
      expect((await models(carol)).status).toBe(401);
      writeFileSync(keys, JSON.stringify({ [admin]: { role: 'admin' }, [carol]: { role: 'user', adapters: ['carol-*'] } }));
      child.kill('SIGHUP');
      await logged(`soppu serve: SIGHUP: keys reloaded from ${keys}: 2 keys`);
      expect((await models(carol)).status).toBe(200);
      writeFileSync(keys, '{"sk-admin-0123456789": {"role": ');
      child.kill('SIGHUP');
      await logged(`soppu serve: SIGHUP: keys reload failed, the 2 keys loaded before stay: keys file ${keys} is not valid JSON`);
      expect((await models(carol)).status).toBe(200);
      expect((await models(admin)).status).toBe(200);
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('one request must fit in the KV cache: the default max total tokens is what --kv-memory-mb holds, and more is refused at start', async () => {
    const root = mkdtempSync(path.join(tmpdir(), 'soppu-serve-'));
    // 16 layers of the tiny shape: 4 KiB of KV per token, so 1 MiB holds 256 tokens (the model allows 2048)
    const model = await generateModel({ out: path.join(root, 'model'), shape: 'tiny', seed: 5, numLayers: 16 });
    const refused = startServe(['--model', model.dir, '--kv-memory-mb', '1', '--max-total-tokens', '1000', '--cache', path.join(root, 'cache')]);
    refused.base.catch(() => undefined); // it never listens
    expect(await refused.exited).not.toBe(0);
    expect(refused.stderr()).toContain('--max-total-tokens (1000) is more than the KV cache holds: --kv-memory-mb 1 holds 256 tokens of this model (4096 bytes each); raise --kv-memory-mb or lower --max-total-tokens');
    const { child, base: listening, exited, stderr } = startServe(['--model', model.dir, '--kv-memory-mb', '1', '--cache', path.join(root, 'cache')]);
    try {
      const base = await listening;
      expect(stderr()).toContain('max total tokens per request: 256, what --kv-memory-mb 1 holds');
      expect(((await (await fetch(`${base}/info`)).json()) as { max_total_tokens: number }).max_total_tokens).toBe(256);
      // no max_new_tokens: the default fits beside the prompt
      const response = await fetch(`${base}/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ inputs: 'Hello there', parameters: { stop: ['zzzz'] } }) });
      expect(response.status).toBe(200);
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    } finally {
      child.kill('SIGKILL');
    }
  });
});
