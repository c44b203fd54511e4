/**
 * `soppu serve` failures that must be one-line CONFIG errors (bad --port, port taken, unknown host,
 * bad keys file), and the demo cache: building the demo touches only its own subfolder.
 */
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync, existsSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { DEMO_DIR_NAME, prepareDemoDir } from '../../src/cli/commands/serve.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { runCli } from './cli-capture.js';

let root: string;
let modelDir: string;
let blocker: Server;
let busyPort: number;

/** The CLI's error output: exactly one `soppu: error [CONFIG]: …` line, no stack trace. */
function configErrorLine(stderr: string): string {
  const lines = stderr.split('\n').filter((line) => line !== '');
  const errors = lines.filter((line) => line.startsWith('soppu: error'));
  expect(errors).toHaveLength(1);
  expect(stderr).not.toMatch(/unexpected error|\n\s+at /);
  expect(errors[0]).toMatch(/^soppu: error \[CONFIG\]: /);
  return errors[0]!;
}

beforeAll(async () => {
  root = mkdtempSync(path.join(tmpdir(), 'soppu-cli-serve-'));
  modelDir = (await generateModel({ out: path.join(root, 'model'), shape: 'tiny', seed: 3 })).dir;
  blocker = createServer();
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
  busyPort = (blocker.address() as { port: number }).port;
});
afterAll(async () => {
  await new Promise<void>((resolve) => blocker.close(() => resolve()));
  rmSync(root, { recursive: true, force: true });
});
afterEach(() => {
  process.exitCode = undefined;
  vi.unstubAllEnvs();
});

const serve = (...args: string[]) => runCli(['serve', '--model', modelDir, '--cache', path.join(root, 'cache'), ...args]);

describe('soppu serve: --port, --host and listen failures', () => {
  it('a port outside 0..65535 or not an integer is a CONFIG error naming --port and the limit', async () => {
    for (const port of ['70000', '65536', 'abc', '1.5', '1e3', '']) {
      const r = await serve('--port', port);
      expect(r.code, port).toBe(1);
      expect(configErrorLine(r.stderr), port).toContain(`--port must be an integer from 0 to 65535 (0 picks a free port), got "${port}"`);
    }
  });

  it('a memory budget past its limit is a CONFIG error naming the flag, not a RangeError from the allocation', async () => {
    for (const [flag, value] of [['--kv-memory-mb', '1e9'], ['--kv-memory-mb', '1000000000'], ['--adapter-memory-mb', '99999999999']] as const) {
      const r = await serve('--port', '0', flag, value);
      expect(r.code, `${flag} ${value}`).toBe(1);
      expect(configErrorLine(r.stderr)).toContain(`${flag} must be an integer from ${flag === '--kv-memory-mb' ? 1 : 0} to 4194304, got "${value}"`);
    }
    // a drain deadline past what a Node timer holds (2^31 − 1 ms) fired at once, cancelling every request
    const drain = await serve('--port', '0', '--drain-deadline-s', '3000000');
    expect(drain.code).toBe(1);
    expect(configErrorLine(drain.stderr)).toContain(`--drain-deadline-s must be an integer from 0 to 2147483, got "3000000"`);
  });

  it('--max-total-tokens past the model\'s context names the flag and the limit (the engine\'s check named its own field)', async () => {
    const limit = (JSON.parse(readFileSync(path.join(modelDir, 'config.json'), 'utf8')) as { max_position_embeddings: number }).max_position_embeddings;
    const r = await serve('--port', '0', '--max-total-tokens', String(limit + 1), '--kv-memory-mb', '64');
    expect(r.code).toBe(1);
    expect(configErrorLine(r.stderr)).toContain(`--max-total-tokens (${limit + 1}) is more than the model's context: ${limit} tokens`);
  });

  it('an --adapters folder that does not exist is a CONFIG error before the model loads', async () => {
    const missing = path.join(root, 'nope');
    const r = await serve('--port', '0', '--adapters', missing);
    expect(r.code).toBe(1);
    expect(configErrorLine(r.stderr)).toContain(`--adapters ${missing}: not a folder`);
  });

  it('a KV budget the machine cannot allocate is a CONFIG error', async () => {
    const { KvBlockPool } = await import('../../src/engine/kv-block-pool.js');
    expect(() => new KvBlockPool({ layers: 1, kvHeads: 1, headDim: 1, blockSize: 1 }, 2 ** 45)).toThrow(/KV cache budget of 35184372088832 bytes cannot be allocated \(.*\); lower it/);
  });

  it('a port in use is one CONFIG line, exit 1', async () => {
    const r = await serve('--port', String(busyPort));
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(`soppu: error [CONFIG]: port ${busyPort} on 127.0.0.1 is already in use (--port)\n`);
  });

  it('a host that does not resolve is one CONFIG line naming --host, exit 1', async () => {
    const r = await serve('--port', '0', '--host', '999.1.1.1');
    expect(r.code).toBe(1);
    expect(configErrorLine(r.stderr)).toMatch(/host 999\.1\.1\.1 cannot be resolved to an address \(--host\)$/);
  });
});

describe('soppu serve --auth', () => {
  it('a keys file with a typo is refused before the model loads, naming the file and entry but not the key', async () => {
    const file = path.join(root, 'keys-typo.json');
    writeFileSync(file, JSON.stringify({ 'sk-admin-0123456789': { role: 'admin' }, 'sk-alice-0123456789': { role: 'user', adapter: ['alice-*'] } }));
    const r = await runCli(['serve', '--model', path.join(root, 'no-such-model'), '--port', '0', '--auth', file, '--cache', path.join(root, 'cache')]);
    expect(r.code).toBe(1);
    const line = configErrorLine(r.stderr);
    expect(line).toContain(`${file}: entry #2: unknown field "adapter" (did you mean "adapters"?)`);
    expect(r.stderr).not.toContain('sk-alice-0123456789');
  });

  it('an empty keys file or one without an admin key loads, with a warning at startup', async () => {
    const empty = path.join(root, 'keys-empty.json');
    writeFileSync(empty, '{}');
    const r = await serve('--port', String(busyPort), '--auth', empty);
    expect(r.code).toBe(1); // the port is taken: the warning is printed before that
    expect(r.stderr).toContain(`soppu serve: WARNING: ${empty} holds no keys: every request to an authenticated route will get 401\n`);
    const users = path.join(root, 'keys-users.json');
    writeFileSync(users, JSON.stringify({ 'sk-alice-0123456789': { role: 'user', adapters: ['alice-*'] } }));
    const u = await serve('--port', String(busyPort), '--auth', users);
    expect(u.stderr).toContain(`soppu serve: WARNING: ${users} has no admin key`);
    expect(u.stderr).not.toContain('sk-alice-0123456789');
  });
});

describe('soppu serve: the demo cache', () => {
  it('prepareDemoDir leaves everything in the cache folder but its own subfolder alone', () => {
    const cache = path.join(root, 'prep');
    mkdirSync(path.join(cache, 'other-tool'), { recursive: true });
    writeFileSync(path.join(cache, 'important.txt'), 'precious');
    writeFileSync(path.join(cache, 'other-tool', 'data'), 'x');
    writeFileSync(path.join(cache, 'READY'), 'not soppu\'s'); // even a file named like the old marker

    const first = prepareDemoDir(cache);
    expect(first).toEqual({ demoDir: path.join(cache, DEMO_DIR_NAME), ready: false });
    expect(readdirSync(cache).sort()).toEqual(['READY', DEMO_DIR_NAME, 'important.txt', 'other-tool'].sort());
    expect(readFileSync(path.join(cache, 'important.txt'), 'utf8')).toBe('precious');
    expect(readFileSync(path.join(cache, 'other-tool', 'data'), 'utf8')).toBe('x');

    // An unfinished build (no READY) is soppu's own: it is cleared and started again.
    writeFileSync(path.join(first.demoDir, 'partial'), 'half');
    expect(prepareDemoDir(cache).ready).toBe(false);
    expect(existsSync(path.join(first.demoDir, 'partial'))).toBe(false);

    // A finished build is reused as it is.
    writeFileSync(path.join(first.demoDir, 'READY'), 'now');
    writeFileSync(path.join(first.demoDir, 'model'), 'm');
    expect(prepareDemoDir(cache).ready).toBe(true);
    expect(existsSync(path.join(first.demoDir, 'model'))).toBe(true);
    expect(readFileSync(path.join(cache, 'important.txt'), 'utf8')).toBe('precious');
  });

  it('a folder named like the demo folder that soppu did not create is never deleted', () => {
    const cache = path.join(root, 'foreign');
    const mine = path.join(cache, DEMO_DIR_NAME);
    mkdirSync(mine, { recursive: true });
    writeFileSync(path.join(mine, 'notes.txt'), 'mine');
    expect(() => prepareDemoDir(cache)).toThrow(/was not created by soppu serve, so soppu will not build the demo there or delete it/);
    try {
      prepareDemoDir(cache);
    } catch (e) {
      expect(isSoppuError(e, 'CONFIG')).toBe(true);
    }
    expect(readFileSync(path.join(mine, 'notes.txt'), 'utf8')).toBe('mine');

    // A link in its place is not followed into whatever it points at.
    const linked = path.join(root, 'linked');
    mkdirSync(linked);
    symlinkSync(cache, path.join(linked, DEMO_DIR_NAME));
    expect(() => prepareDemoDir(linked)).toThrow(/is a symbolic link/);
    expect(readFileSync(path.join(mine, 'notes.txt'), 'utf8')).toBe('mine');
  });

  it('serve without --model builds the demo in $SOPPU_CACHE/soppu-demo-v1 and keeps an unrelated file there', async () => {
    const cache = path.join(root, 'user-cache');
    mkdirSync(cache);
    writeFileSync(path.join(cache, 'important.txt'), 'precious');
    vi.stubEnv('SOPPU_CACHE', cache);
    // The port is taken, so serve stops right after the build (before it would wait for SIGTERM).
    const r = await runCli(['serve', '--port', String(busyPort)]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`building the demo (tiny model + 100 compressed user adapters) in ${path.join(cache, DEMO_DIR_NAME)}`);
    expect(r.stderr).toContain(`port ${busyPort} on 127.0.0.1 is already in use (--port)`);
    expect(readFileSync(path.join(cache, 'important.txt'), 'utf8')).toBe('precious');
    expect(readdirSync(cache).sort()).toEqual(['important.txt', DEMO_DIR_NAME]);
    expect(readdirSync(path.join(cache, DEMO_DIR_NAME)).sort()).toEqual(['.soppu-demo', 'READY', 'bank', 'model']);

    const again = await runCli(['serve', '--port', String(busyPort)]);
    expect(again.code).toBe(1);
    expect(again.stderr).not.toContain('building the demo');
    expect(readFileSync(path.join(cache, 'important.txt'), 'utf8')).toBe('precious');
  });
});
