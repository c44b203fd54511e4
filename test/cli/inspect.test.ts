import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { AdapterGenerator } from '../../src/io/fixtures/generate-adapters.js';
import { frobeniusNormOfDelta } from '../../src/io/frobenius-norm-of-delta.js';
import { writeSafetensors } from '../../src/io/safetensors.js';
import { saveLoraAdapter } from '../../src/io/save-lora-adapter.js';
import { runCli } from './cli-capture.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-cli-inspect-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('soppu inspect', () => {
  it('describes an adapter: modules, ranks, scale, ‖scale·B·A‖_F, flags', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 4, alpha: 12, seed: 2 }).adapter(0);
    const dir = join(root, 'adapter');
    await saveLoraAdapter(dir, adapter, { doubledPrefix: true });
    const json = await runCli(['inspect', dir, '--json']);
    expect(json.code).toBe(0);
    const summary = JSON.parse(json.stdout);
    expect(summary).toMatchObject({ kind: 'adapter', base_model: 'soppu/tiny', r: 4, lora_alpha: 12, dtype: 'F32', flags: ['doubled-prefix'], ranks: [4] });
    expect(summary.parameter_count).toBe(2 * 4 * (64 + 64) + 2 * 4 * (64 + 32));
    const q = summary.modules.find((m: { path: string }) => m.path === 'model.layers.1.self_attn.q_proj');
    expect(q).toMatchObject({ layer: 1, module: 'q_proj', rank: 4, in_features: 64, out_features: 64, scale: 3 });
    expect(q.delta_norm).toBeCloseTo(frobeniusNormOfDelta(adapter.modules.get('model.layers.1.self_attn.q_proj')!), 10);
    const text = await runCli(['inspect', dir]);
    expect(text.stdout).toMatch(/base model: +soppu\/tiny/);
    expect(text.stdout).toMatch(/flags: +doubled-prefix/);
    expect(text.stdout).toMatch(/model\.layers\.0\.self_attn\.v_proj +4 +\[4, 64\] +\[32, 4\] +3 +\d\.\d+/);
  });

  it('describes a bare safetensors file: metadata and tensor table', async () => {
    const path = join(root, 'w.safetensors');
    await writeSafetensors(path, [{ name: 'w', dtype: 'BF16', shape: [2, 3], data: new Uint16Array(6) }, { name: 'b', dtype: 'F32', shape: [3], data: new Float32Array(3) }], { format: 'pt' });
    const json = JSON.parse((await runCli(['inspect', path, '--json'])).stdout);
    expect(json).toEqual({
      kind: 'safetensors', path, metadata: { format: 'pt' }, tensor_count: 2, data_bytes: 24,
      tensors: [{ name: 'b', dtype: 'F32', shape: [3], data_offsets: [0, 12] }, { name: 'w', dtype: 'BF16', shape: [2, 3], data_offsets: [12, 24] }],
    });
    const text = (await runCli(['inspect', path])).stdout;
    expect(text).toMatch(/format: pt/);
    expect(text).toMatch(/w +BF16 +\[2, 3\] +\[12, 24\)/);
  });

  it('prints errors as one clean line', async () => {
    const missing = await runCli(['inspect', join(root, 'nope')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/^soppu: error \[FILE_NOT_FOUND\]: .*nope: no such file or directory\n$/);
    const corrupt = join(root, 'bad.safetensors');
    await writeFile(corrupt, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0, 0x7b]));
    const bad = await runCli(['inspect', corrupt]);
    expect(bad.stderr).toMatch(/^soppu: error \[SAFETENSORS_HEADER\]: .*bad\.safetensors: header length 1 is too short for a JSON object\n$/);
    const dir = join(root, 'empty-adapter');
    await rm(dir, { recursive: true, force: true });
    await (await import('node:fs/promises')).mkdir(dir);
    const noConfig = await runCli(['inspect', dir]);
    expect(noConfig.stderr).toMatch(/^soppu: error \[ADAPTER_CONFIG\]: .*adapter_config\.json: missing/);
    expect(noConfig.stderr.split('\n')).toHaveLength(2);
  });
});
