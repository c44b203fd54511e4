import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressDirectoriesToBank } from '../../src/compress/bank-compress.js';
import { createEngine } from '../../src/engine/engine.js';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { runCli } from '../cli/cli-capture.js';
import { collect } from './helpers.js';

describe('soppu generate (generated tiny model and adapters on disk)', () => {
  let dir = '';
  let modelDir = '';
  let adapterDirs: string[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'soppu-generate-'));
    modelDir = join(dir, 'model');
    await generateModel({ out: modelDir, shape: 'tiny', seed: 3 });
    adapterDirs = await writeGeneratedAdapters(join(dir, 'adapters'), 2, { base: BASE_SHAPES.tiny, rank: 4, seed: 9, deltaStd: 0.5 });
    await compressDirectoriesToBank(adapterDirs.map((d, i) => `bank-${i}=${d}`), join(dir, 'bank'), { compress: { method: 'jd-full', rank: 6, seed: 1 } });
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const engineOptions = () => ({
    modelDir,
    kvBudgetBytes: 8 << 20,
    adapterBudgetBytes: 8 << 20,
    maxBatchTokens: 64,
    maxRunningRequests: 8,
    maxInputTokens: 256,
    maxTotalTokens: 512,
    blockSize: 16,
  });

  it('prints the generated text alone on stdout, equal to the engine output; timings on stderr', async () => {
    const engine = await createEngine(engineOptions());
    const prompt = 'hello there';
    const expected = await collect(engine.generate({ prompt, maxNewTokens: 8, adapterId: 'a', adapterSource: 'local', adapterPath: adapterDirs[0]! }));
    const base = await collect(engine.generate({ prompt, maxNewTokens: 8 }));
    const result = await runCli(['generate', '--model', modelDir, '--adapter', adapterDirs[0]!, '--prompt', prompt, '--max-new-tokens', '8']);
    expect(result.code).toBe(0);
    expect(result.stdout).toBe(`${expected.text}\n`);
    expect(result.stderr).toMatch(/decode .* tokens\/s/);
    expect(expected.tokens).not.toEqual(base.tokens);
    const baseCli = await runCli(['generate', '--model', modelDir, '--prompt', prompt, '--max-new-tokens', '8']);
    expect(baseCli.stdout).toBe(`${base.text}\n`);
  });

  it('--lora-dtype bf16 serves the adapter with 16-bit factors, as the engine option does; a bad value is refused', async () => {
    const engine = await createEngine({ ...engineOptions(), loraDtype: 'bf16' });
    const expected = await collect(engine.generate({ prompt: 'abc', maxNewTokens: 6, adapterId: 'a', adapterSource: 'local', adapterPath: adapterDirs[1]! }));
    const result = await runCli(['generate', '--model', modelDir, '--adapter', adapterDirs[1]!, '--prompt', 'abc', '--max-new-tokens', '6', '--lora-dtype', 'bf16']);
    expect(result.code).toBe(0);
    expect(result.stdout).toBe(`${expected.text}\n`);
    const bad = await runCli(['generate', '--model', modelDir, '--prompt', 'abc', '--lora-dtype', 'f64']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/--lora-dtype must be one of auto, f32, bf16, f16, got "f64"/);
    // before the model loads: a bad model folder does not hide it
    const badFirst = await runCli(['generate', '--model', join(modelDir, 'nope'), '--prompt', 'abc', '--lora-dtype', 'f64']);
    expect(badFirst.stderr).toMatch(/--lora-dtype must be one of auto, f32, bf16, f16, got "f64"/);
  });

  it('serves a bank adapter with --bank and --adapter-id', async () => {
    const engine = await createEngine({ ...engineOptions(), bankDir: join(dir, 'bank') });
    const expected = await collect(engine.generate({ prompt: 'hi', maxNewTokens: 6, adapterId: 'bank-1' }));
    const result = await runCli(['generate', '--model', modelDir, '--bank', join(dir, 'bank'), '--adapter-id', 'bank-1', '--prompt', 'hi', '--max-new-tokens', '6']);
    expect(result.code).toBe(0);
    expect(result.stdout).toBe(`${expected.text}\n`);
    const unknown = await runCli(['generate', '--model', modelDir, '--bank', join(dir, 'bank'), '--adapter-id', 'nope', '--prompt', 'hi']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/\[ADAPTER_NOT_FOUND\]/);
  });

  it('samples reproducibly with --temperature and --seed', async () => {
    const argv = ['generate', '--model', modelDir, '--prompt', 'abc', '--max-new-tokens', '8', '--temperature', '1.3', '--seed', '5', '--ignore-eos'];
    const first = await runCli(argv);
    const second = await runCli(argv);
    expect(first.code).toBe(0);
    expect(second.stdout).toBe(first.stdout);
    expect(first.stderr).toMatch(/seed 5/);
  });

  it('reports bad options and a broken adapter with a coded error', async () => {
    const mixed = await runCli(['generate', '--model', modelDir, '--bank', dir, '--prompt', 'x']);
    expect(mixed.code).toBe(1);
    expect(mixed.stderr).toMatch(/\[CONFIG\].*--adapter-id/);
    const missing = await runCli(['generate', '--model', modelDir, '--adapter', join(dir, 'nope'), '--prompt', 'x']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/\[ADAPTER_LOAD\].*nope/);
    // empty values are refused, not read as 0 or as "no adapter"
    for (const [flag, message] of [['--temperature', /--temperature must be a number, got ""/], ['--seed', /--seed must be an integer from 0 to 9007199254740991, got ""/], ['--adapter', /--adapter is empty/], ['--stop', /--stop takes non-empty sequences/]] as const) {
      const empty = await runCli(['generate', '--model', modelDir, '--prompt', 'x', flag, '']);
      expect(empty.code, flag).toBe(1);
      expect(empty.stderr, flag).toMatch(message);
    }
    // sampling flags without --temperature: generate is greedy, so they are refused rather than ignored (--seed)
    // or taken to sample at temperature 1 (--top-k, --top-p)
    for (const [flag, value] of [['--top-k', '5'], ['--top-p', '0.9'], ['--seed', '7']] as const) {
      const alone = await runCli(['generate', '--model', modelDir, '--prompt', 'x', flag, value]);
      expect(alone.code, flag).toBe(1);
      expect(alone.stderr, flag).toContain(`${flag} is for sampling: give --temperature too (generate is greedy without one)`);
    }
    // integers are decimal digits within 2^53: a larger seed is not silently rounded to another one
    for (const seed of ['18446744073709551616', '1e30', '0x10', '1.5', '-1']) {
      const refused = await runCli(['generate', '--model', modelDir, '--prompt', 'x', '--seed', seed]);
      expect(refused.code, seed).toBe(1);
      expect(refused.stderr, seed).toContain(`--seed must be an integer from 0 to 9007199254740991, got "${seed}"`);
    }
  });
});
