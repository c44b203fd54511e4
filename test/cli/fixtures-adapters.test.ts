import { mkdtemp, readFile, readdir, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import { buildProgram } from '../../src/cli/main.js';
import { runCli } from './cli-capture.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-cli-fixtures-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('soppu fixtures adapters', () => {
  it('lives in one fixtures group next to fixtures model', () => {
    const groups = buildProgram().commands.filter((c) => c.name() === 'fixtures');
    expect(groups).toHaveLength(1);
    expect(groups[0]!.commands.map((c) => c.name()).sort()).toEqual(['adapters', 'model']);
  });

  it('writes N loadable, deterministic adapters', async () => {
    const out = join(root, 'tiny');
    const args = ['fixtures', 'adapters', '--base', 'tiny', '--count', '3', '--out', out, '--rank', '4', '--targets', 'q_proj,down_proj', '--shared-rank', '2', '--dtype', 'bf16', '--seed', '9', '--alpha', '16'];
    const first = await runCli(args);
    expect(first.stderr).toBe('');
    expect(first.code).toBe(0);
    expect(first.stdout).toMatch(/wrote 3 adapters for tiny/);
    expect((await readdir(out)).sort()).toEqual(['user-0000', 'user-0001', 'user-0002']);
    const adapter = await loadLoraAdapter(join(out, 'user-0002'));
    expect(adapter.sourceDtype).toBe('BF16');
    expect([...adapter.modules.values()].map((m) => [m.path, m.rank, m.scale, m.inFeatures, m.outFeatures])).toEqual([
      ['model.layers.0.mlp.down_proj', 4, 4, 128, 64], ['model.layers.0.self_attn.q_proj', 4, 4, 64, 64],
      ['model.layers.1.mlp.down_proj', 4, 4, 128, 64], ['model.layers.1.self_attn.q_proj', 4, 4, 64, 64],
    ]);
    const bytes = await readFile(join(out, 'user-0001', 'adapter_model.safetensors'));
    const again = join(root, 'tiny-again');
    expect((await runCli([...args.slice(0, 7), again, ...args.slice(8)])).code).toBe(0);
    expect(await readFile(join(again, 'user-0001', 'adapter_model.safetensors'))).toEqual(bytes);
  });

  it('takes shapes from a model directory and supports gpt2 with key variants', async () => {
    const model = join(root, 'model');
    await mkdir(model);
    await writeFile(join(model, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 1, num_hidden_layers: 1 }));
    const out = join(root, 'from-model');
    const result = await runCli(['fixtures', 'adapters', '--model', model, '--count', '1', '--out', out, '--rank', '2', '--targets', 'k_proj', '--json']);
    expect(result.code).toBe(0);
    expect(JSON.parse(result.stdout)).toMatchObject({ count: 1, dtype: 'f32' });
    const k = (await loadLoraAdapter(join(out, 'user-0000'))).modules.get('model.layers.0.self_attn.k_proj')!;
    expect([k.inFeatures, k.outFeatures]).toEqual([32, 8]);
    // the base model is recorded as one name however the folder was typed, so these adapters go together
    const relativeOut = join(root, 'from-model-relative');
    const typed = `${relative(process.cwd(), model)}/./`;
    expect((await runCli(['fixtures', 'adapters', '--model', typed, '--count', '1', '--out', relativeOut, '--rank', '2', '--targets', 'k_proj'])).code).toBe(0);
    const baseOf = async (dir: string) => JSON.parse(await readFile(join(dir, 'user-0000', 'adapter_config.json'), 'utf8')).base_model_name_or_path;
    expect(await baseOf(relativeOut)).toBe(model);
    expect(await baseOf(out)).toBe(model);
    const gpt2 = join(root, 'gpt2');
    expect((await runCli(['fixtures', 'adapters', '--base', 'gpt2', '--count', '1', '--out', gpt2, '--rank', '2', '--layers', '1', '--doubled-prefix', '--adapter-name', 'default', '--rslora'])).code).toBe(0);
    const loaded = await loadLoraAdapter(join(gpt2, 'user-0000'));
    expect(loaded.flags).toEqual(['doubled-prefix', 'adapter-name-in-keys']);
    expect(loaded.modules.get('transformer.h.0.attn.c_attn')!.scale).toBeCloseTo(4 / Math.SQRT2, 12);
  });

  it('refuses bad options with one clean line', async () => {
    const bad = await runCli(['fixtures', 'adapters', '--base', 'gpt3', '--count', '1', '--out', join(root, 'x')]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe('soppu: error [CONFIG]: --base must be one of tiny, smollm-135m, llama-7b-shapes, gpt2 (got "gpt3")\n');
    const target = await runCli(['fixtures', 'adapters', '--count', '1', '--out', join(root, 'x'), '--targets', 'c_fc']);
    expect(target.stderr).toMatch(/^soppu: error \[CONFIG\]: target module "c_fc" does not exist in tiny/);
    const count = await runCli(['fixtures', 'adapters', '--count', '-1', '--out', join(root, 'x')]);
    expect(count.code).not.toBe(0);
    // a folder that already holds files is not written over without --force (adapters of another model were)
    const held = join(root, 'held');
    expect((await runCli(['fixtures', 'adapters', '--count', '1', '--out', held])).code).toBe(0);
    const again = await runCli(['fixtures', 'adapters', '--count', '1', '--out', held, '--seed', '4']);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain(`--out ${held} already holds files (user-0000); choose a new or empty folder, or pass --force to write into it`);
    expect((await runCli(['fixtures', 'adapters', '--count', '1', '--out', held, '--seed', '4', '--force'])).code).toBe(0);
  });
});
