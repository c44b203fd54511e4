import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { runCli } from '../cli/cli-capture.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soppu-gguf-cli-'));
  await generateModel({ out: join(dir, 'model'), shape: 'tiny', dtype: 'f32', seed: 1 });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function ggufHeader(bytes: Uint8Array): { magic: string; version: number; tensors: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { magic: new TextDecoder().decode(bytes.subarray(0, 4)), version: view.getUint32(4, true), tensors: Number(view.getBigUint64(8, true)) };
}

describe('soppu export-gguf', () => {
  it('writes the model as GGUF in the requested type', async () => {
    const out = join(dir, 'model.gguf');
    const result = await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', out, '--dtype', 'f16']);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/21 tensors \(f16\)/);
    expect(ggufHeader(new Uint8Array(await readFile(out)))).toEqual({ magic: 'GGUF', version: 3, tensors: 21 });
  });

  it('writes a PEFT adapter as a GGUF LoRA adapter with --lora', async () => {
    const [adapter] = await writeGeneratedAdapters(join(dir, 'adapters'), 1, { base: BASE_SHAPES.tiny, rank: 2, seed: 1 });
    const out = join(dir, 'lora.gguf');
    const result = await runCli(['export-gguf', '--model', join(dir, 'model'), '--lora', adapter!, '-o', out]);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/GGUF LoRA adapter, 8 tensors/);
    expect(ggufHeader(new Uint8Array(await readFile(out))).tensors).toBe(8);
  });

  it('rejects a bad --dtype (or its old name --type) and a missing model with a coded error', async () => {
    const bad = await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', join(dir, 'x.gguf'), '--dtype', 'q4']);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/\[CONFIG\].*--dtype must be f32, f16 or bf16/);
    const old = await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', join(dir, 'x.gguf'), '--type', 'q4']);
    expect(old.stderr).toMatch(/\[CONFIG\].*--type must be f32, f16 or bf16/);
    // an existing file is replaced only with --force (-o model/model.safetensors destroyed the model); the output is a .gguf
    const weights = join(dir, 'model', 'model.safetensors');
    const before = await readFile(weights);
    const overwrite = await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', weights]);
    expect(overwrite.code).toBe(1);
    expect(overwrite.stderr).toMatch(/\[CONFIG\].*the output must be a \.gguf file/);
    expect(await readFile(weights)).toEqual(before);
    const first = join(dir, 'twice.gguf');
    expect((await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', first])).code).toBe(0);
    const again = await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', first]);
    expect(again.stderr).toMatch(/\[CONFIG\].*twice\.gguf exists: choose another name, or pass --force/);
    expect((await runCli(['export-gguf', '--model', join(dir, 'model'), '-o', first, '--force'])).code).toBe(0);
    const missing = await runCli(['export-gguf', '--model', join(dir, 'nope'), '-o', join(dir, 'y.gguf')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/\[FILE_NOT_FOUND\].*nope/);
  });
});
