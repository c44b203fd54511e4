import { copyFile, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { openSafetensors, writeSafetensors } from '../../src/io/safetensors.js';
import type { TensorToWrite } from '../../src/io/safetensors-types.js';
import { refKernels } from '../../src/kernels/index.js';
import { loadLlamaConfig } from '../../src/model/llama-config.js';
import { loadLlamaModel, modelWeightBytes } from '../../src/model/llama-model.js';
import { loadLlamaWeights } from '../../src/model/load-weights.js';
import { maxAbsDiff, modelDir, runSequence, tempDir } from './model-helpers.js';

/** Copy a generated model, rewriting its tensors with `edit`. */
async function editedModel(edit: (tensors: TensorToWrite[]) => TensorToWrite[]): Promise<string> {
  const source = await modelDir();
  const dir = await tempDir();
  for (const name of ['config.json', 'tokenizer.json', 'tokenizer_config.json']) await copyFile(join(source, name), join(dir, name));
  const file = await openSafetensors(join(source, 'model.safetensors'));
  const tensors: TensorToWrite[] = [];
  for (const info of file.tensors) tensors.push({ name: info.name, dtype: info.dtype, shape: info.shape, data: await file.read(info.name) });
  await file.close();
  await writeSafetensors(join(dir, 'model.safetensors'), edit(tensors));
  return dir;
}

describe('model generator', () => {
  it('is deterministic: the same options give byte-identical files; another seed differs', async () => {
    const [a, b, c] = [await tempDir(), await tempDir(), await tempDir()];
    await generateModel({ out: a, seed: 5, dtype: 'bf16', arch: 'qwen2' });
    await generateModel({ out: b, seed: 5, dtype: 'bf16', arch: 'qwen2' });
    await generateModel({ out: c, seed: 6, dtype: 'bf16', arch: 'qwen2' });
    const files = (await readdir(a)).sort();
    expect(files).toEqual(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect((await readdir(b)).sort()).toEqual(files);
    for (const name of files) expect(Buffer.compare(await readFile(join(a, name)), await readFile(join(b, name))), name).toBe(0);
    expect(Buffer.compare(await readFile(join(a, 'model.safetensors')), await readFile(join(c, 'model.safetensors')))).not.toBe(0);
  });

  it('writes shards with an index that load to the same model as one file', async () => {
    const dir = await tempDir();
    const generated = await generateModel({ out: dir, seed: 2, shards: 3 });
    expect(generated.files).toEqual(['config.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors', 'model.safetensors.index.json', 'tokenizer.json', 'tokenizer_config.json']);
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> };
    expect(new Set(Object.values(index.weight_map)).size).toBe(3);
    expect(index.metadata.total_size).toBe(generated.weightBytes);
    const sharded = await loadLlamaModel(dir);
    const single = await loadLlamaModel(await modelDir({ seed: 2 }));
    expect(modelWeightBytes(sharded)).toBe(generated.weightBytes);
    const prompt = [1, 2, 3, 4, 5];
    const a = runSequence(sharded, refKernels, prompt, 3);
    const b = runSequence(single, refKernels, prompt, 3);
    for (let i = 0; i < prompt.length; i++) expect(maxAbsDiff(a[i]!, b[i]!)).toBe(0);
    // regenerating the folder unsharded removes the stale shards
    await generateModel({ out: dir, seed: 2 });
    expect((await readdir(dir)).sort()).toEqual(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  });
});

describe('loadLlamaWeights', () => {
  it('keeps matmul weights in their stored dtype and widens norms and biases', async () => {
    const model = await loadLlamaModel(await modelDir({ dtype: 'bf16', arch: 'qwen2', tied: true }));
    const layer = model.weights.layers[0]!;
    expect(layer.q.weight.dtype).toBe('bf16');
    expect(layer.q.weight.data).toBeInstanceOf(Uint16Array);
    expect(layer.q.bias).toBeInstanceOf(Float32Array);
    expect(layer.o.bias).toBeNull();
    expect(layer.inputNorm).toBeInstanceOf(Float32Array);
    expect(model.weights.lmHead).toBe(model.weights.embedding);
    const f16 = await loadLlamaModel(await modelDir({ dtype: 'f16' }));
    expect(f16.weights.layers[1]!.down.weight.dtype).toBe('f16');
    expect(f16.weights.lmHead).not.toBe(f16.weights.embedding);
  });

  it('places every matrix in one buffer from the allocator, each at a 64-byte boundary, with the file\'s bytes', async () => {
    const dir = await modelDir({ dtype: 'bf16', arch: 'qwen2' });
    const config = await loadLlamaConfig(dir);
    const requests: number[] = [];
    const weights = await loadLlamaWeights(dir, config, { allocate: (bytes) => (requests.push(bytes), new ArrayBuffer(bytes)) });
    expect(requests).toHaveLength(1);
    const matrices = [weights.embedding, weights.lmHead, ...weights.layers.flatMap((l) => [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].map((linear) => linear.weight))];
    const arena = weights.embedding.data.buffer;
    expect(arena.byteLength).toBe(requests[0]);
    const file = await openSafetensors(join(dir, 'model.safetensors'));
    try {
      for (const [i, matrix] of matrices.entries()) {
        expect(matrix.data.buffer, `matrix ${i}`).toBe(arena);
        expect(matrix.data.byteOffset % 64, `matrix ${i}`).toBe(0);
      }
      // views do not overlap: sorted by offset, each ends before the next starts
      const spans = matrices.map((m) => [m.data.byteOffset, m.data.byteOffset + m.data.byteLength] as const).sort((a, b) => a[0] - b[0]);
      for (let i = 1; i < spans.length; i++) expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1]);
      expect(Array.from(weights.layers[1]!.down.weight.data)).toEqual(Array.from((await file.read('model.layers.1.mlp.down_proj.weight')) as Uint16Array));
      expect(Array.from(weights.lmHead.data)).toEqual(Array.from((await file.read('lm_head.weight')) as Uint16Array));
      // biases and norms stay apart, widened to f32
      expect(weights.layers[0]!.q.bias!.buffer).not.toBe(arena);
      // with a cap per buffer: the matrices fill buffers in file order, none over the cap unless one matrix is
      const cap = 10_000;
      const capped: ArrayBuffer[] = [];
      const split = await loadLlamaWeights(dir, config, { maxBufferBytes: cap, allocate: (bytes) => (capped.push(new ArrayBuffer(bytes)), capped.at(-1)!) });
      const splitMatrices = [split.embedding, split.lmHead, ...split.layers.flatMap((l) => [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].map((linear) => linear.weight))];
      expect(capped.length).toBeGreaterThan(2);
      for (const buffer of capped) {
        const inside = splitMatrices.filter((m) => m.data.buffer === buffer);
        expect(inside.length).toBeGreaterThan(0);
        if (inside.length > 1) expect(buffer.byteLength).toBeLessThanOrEqual(cap);
      }
      splitMatrices.forEach((m, i) => {
        expect(capped.includes(m.data.buffer as ArrayBuffer), `matrix ${i}`).toBe(true);
        expect(Array.from(m.data), `matrix ${i}`).toEqual(Array.from(matrices[i]!.data));
      });
    } finally {
      await file.close();
    }
  });

  it('names a missing tensor and its expected shape', async () => {
    const dir = await editedModel((tensors) => tensors.filter((t) => t.name !== 'model.layers.1.mlp.up_proj.weight'));
    await expect(loadLlamaModel(dir)).rejects.toMatchObject({ code: 'MODEL_WEIGHTS', message: expect.stringMatching(/model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[128, 64\]\) is missing/) });
  });

  it('names a misshapen tensor, its shape and the expected one', async () => {
    const dir = await editedModel((tensors) => tensors.map((t) => (t.name === 'model.layers.0.self_attn.k_proj.weight' ? { ...t, shape: [64, 32] } : t)));
    await expect(loadLlamaModel(dir)).rejects.toMatchObject({ code: 'MODEL_WEIGHTS', message: expect.stringMatching(/k_proj\.weight in .* has shape \[64, 32\], expected \[32, 64\]/) });
  });

  it('refuses unsupported dtypes and a missing lm_head of an untied model', async () => {
    const intNorm = await editedModel((tensors) => tensors.map((t) => (t.name === 'model.norm.weight' ? { ...t, dtype: 'I32', data: new Int32Array(64) } : t)));
    await expect(loadLlamaModel(intNorm)).rejects.toMatchObject({ code: 'MODEL_WEIGHTS', message: expect.stringMatching(/model\.norm\.weight .* dtype I32; supported: F32, BF16, F16/) });
    const noHead = await editedModel((tensors) => tensors.filter((t) => t.name !== 'lm_head.weight'));
    await expect(loadLlamaModel(noHead)).rejects.toMatchObject({ code: 'MODEL_WEIGHTS', message: expect.stringContaining('lm_head.weight (expected shape [512, 64]) is missing') });
  });

  it('refuses a folder without weights and a shard index that escapes the folder', async () => {
    const dir = await tempDir();
    await copyFile(join(await modelDir(), 'config.json'), join(dir, 'config.json'));
    await expect(loadLlamaModel(dir)).rejects.toMatchObject({ code: 'FILE_NOT_FOUND', message: expect.stringContaining('model.safetensors.index.json') });
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'model.norm.weight': '../model.safetensors' } }));
    await expect(loadLlamaModel(dir)).rejects.toMatchObject({ code: 'MODEL_WEIGHTS', message: expect.stringContaining('plain file name') });
    await expect(loadLlamaModel(join(dir, 'nothing-here'))).rejects.toMatchObject({ code: 'FILE_NOT_FOUND' });
  });
});
