import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { main } from '../../src/cli/main.js';
import { loadLlamaModel } from '../../src/model/llama-model.js';
import { tempDir } from './model-helpers.js';

async function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  vi.spyOn(process.stdout, 'write').mockImplementation((chunk) => ((stdout += String(chunk)), true));
  vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => ((stderr += String(chunk)), true));
  const code = await main(args);
  vi.restoreAllMocks();
  return { code, stdout, stderr };
}

afterEach(() => vi.restoreAllMocks());

describe('soppu fixtures model', () => {
  it('writes a loadable model with the asked architecture, dtype, tying and shards', async () => {
    const out = await tempDir('soppu-cli-model-');
    const result = await run(['fixtures', 'model', '--out', out, '--arch', 'mistral', '--dtype', 'f16', '--tied', '--shards', '2', '--seed', '9', '--json']);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const summary = JSON.parse(result.stdout) as { files: string[]; weight_bytes: number };
    expect(summary.files).toContain('model.safetensors.index.json');
    expect((await readdir(out)).filter((f) => f.endsWith('.safetensors'))).toHaveLength(2);
    const config = JSON.parse(await readFile(join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    expect(config).toMatchObject({ architectures: ['MistralForCausalLM'], torch_dtype: 'float16', tie_word_embeddings: true, hidden_size: 64, num_hidden_layers: 2 });
    const model = await loadLlamaModel(out);
    expect(model.config.architecture).toBe('mistral');
    expect(model.weights.embedding.dtype).toBe('f16');
    expect(model.weights.lmHead).toBe(model.weights.embedding);
    // again into the same folder (a real model's shards could be there): refused unless --force
    const again = await run(['fixtures', 'model', '--out', out]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/^soppu: error \[CONFIG\]: --out .* already holds files \(.*\); choose a new or empty folder, or pass --force to write into it/);
    expect((await readdir(out)).filter((f) => f.endsWith('.safetensors'))).toHaveLength(2);
    expect((await run(['fixtures', 'model', '--out', out, '--force'])).code).toBe(0);
    expect((await readdir(out)).filter((f) => f.endsWith('.safetensors'))).toEqual(['model.safetensors']);
    const onFile = await run(['fixtures', 'model', '--out', join(out, 'config.json')]);
    expect(onFile.stderr).toMatch(/^soppu: error \[FILE_IO\]: --out .*config\.json: is a file, not a folder/);
    const underFile = await run(['fixtures', 'model', '--out', join(out, 'config.json', 'sub')]);
    expect(underFile.stderr).toMatch(/^soppu: error \[FILE_IO\]: .*sub: cannot create the model folder/);
  });

  it('writes SmolLM-135M widths (layer count overridable) with a 49152-token vocabulary', async () => {
    const out = await tempDir('soppu-cli-model-');
    const result = await run(['fixtures', 'model', '--out', out, '--shape', 'smollm-135m', '--layers', '1', '--dtype', 'bf16']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/^wrote .*model\.safetensors/);
    const model = await loadLlamaModel(out);
    expect(model.config).toMatchObject({ hiddenSize: 576, intermediateSize: 1536, numHeads: 9, numKvHeads: 3, headDim: 64, vocabSize: 49152, numLayers: 1, tieWordEmbeddings: true });
  });

  it('refuses bad options with a one-line CONFIG error', async () => {
    const out = await tempDir('soppu-cli-model-');
    for (const [args, message] of [
      [['--shape', 'huge'], /--shape must be one of tiny, smollm-135m/],
      [['--dtype', 'f64'], /--dtype must be one of f32, bf16, f16/],
      [['--seed', '-3'], /--seed must be an integer from 0 to 9007199254740991, got "-3"/],
      [['--shards', '0'], /--shards must be an integer from 1 to 9007199254740991, got "0"/],
    ] as const) {
      const result = await run(['fixtures', 'model', '--out', out, ...args]);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(/^soppu: error \[CONFIG\]: /);
      expect(result.stderr).toMatch(message);
    }
  });
});
