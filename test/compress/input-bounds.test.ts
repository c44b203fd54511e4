/**
 * What compress and serving do with adapters they cannot represent faithfully: passthrough tensors
 * (modules_to_save heads, biases) are carried by compress and export but refused for serving; a scale
 * or ΔW beyond f32 is refused before a bank is written; f16 export refuses values beyond ±65504.
 */
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import { exportAdapter } from '../../src/compress/export-adapter.js';
import { syntheticAdapter, syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { createEngine, slotShapeOf } from '../../src/engine/engine.js';
import { residentFromBank, residentFromLora } from '../../src/engine/resident-adapter.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import type { LoraAdapter, LoraModule, PassthroughTensor } from '../../src/io/lora-types.js';
import { saveLoraAdapter } from '../../src/io/save-lora-adapter.js';
import { charTokenizer, collect, randomLora, tinyModel } from '../engine/helpers.js';

const model = tinyModel(11);
const shape = slotShapeOf(model.config);
let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-input-bounds-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const HEAD = 'base_model.model.lm_head.weight';
const BIAS = 'base_model.model.model.layers.0.self_attn.q_proj.bias';
const f32Tensor = (name: string, dims: number[]): PassthroughTensor => ({
  name, dtype: 'F32', shape: dims, bytes: new Uint8Array(Float32Array.from({ length: dims.reduce((a, b) => a * b, 1) }, (_, i) => i / 7).buffer),
});
/** A random adapter over the tiny model carrying a modules_to_save head and a base-layer bias. */
function withPassthrough(seed: number): LoraAdapter {
  const adapter = randomLora(model.config, seed, 4, 8);
  return {
    ...adapter,
    passthrough: [f32Tensor(HEAD, [model.config.vocabSize, model.config.hiddenSize]), f32Tensor(BIAS, [model.config.hiddenSize])],
    config: { ...adapter.config, modulesToSave: ['lm_head'], bias: 'all' },
  };
}
const refusesPassthrough = { code: 'ADAPTER_UNSUPPORTED', message: expect.stringMatching(/tensor "base_model\.model\.lm_head\.weight" \(and 1 more\) is not a LoRA factor .*SOPPU serves LoRA deltas only.*can still be compressed and exported/) };

describe('passthrough tensors are carried, never served', () => {
  it('residentFromLora refuses an adapter with passthrough tensors, naming the first', () => {
    expect(() => residentFromLora('h', withPassthrough(1), shape)).toThrow(expect.objectContaining({ ...refusesPassthrough, context: expect.objectContaining({ tensor: HEAD }) }));
    expect(residentFromLora('plain', randomLora(model.config, 1, 4, 8), shape).slots.size).toBeGreaterThan(0);
  });

  it('a modules_to_save directory is refused by the engine, but compresses and exports with its head; the bank refuses to serve it', async () => {
    const dir = join(root, 'with-head');
    await saveLoraAdapter(dir, withPassthrough(2));
    const loaded = await loadLoraAdapter(dir);
    expect(loaded.passthrough.map((p) => p.name)).toEqual([HEAD, BIAS]);

    const bankDir = join(root, 'bank');
    await compressIntoBank([{ id: 'head', adapter: loaded }, { id: 'plain', adapter: randomLora(model.config, 3, 4, 8) }], bankDir, { compress: { method: 'jd-full', rank: 6, seed: 1 } });
    const bank = await openBank(bankDir);
    const parts = await bank.loadAdapter('head');
    expect(parts.passthrough).toEqual([HEAD, BIAS]);
    expect((await bank.loadAdapter('plain')).passthrough).toEqual([]);
    expect(() => residentFromBank(parts, new Map(), shape, bank.dir)).toThrow(expect.objectContaining(refusesPassthrough));
    const exported = join(root, 'head-export');
    await exportAdapter(bank, 'head', exported);
    expect((await loadLoraAdapter(exported)).passthrough).toEqual(loaded.passthrough);

    const engine = await createEngine({
      model, tokenizer: charTokenizer(), bank, kvBudgetBytes: 256 * 2048, adapterBudgetBytes: 1 << 26, maxBatchTokens: 256,
      maxRunningRequests: 8, maxInputTokens: 128, maxTotalTokens: 256, blockSize: 8, seed: 7,
    });
    try {
      await expect(engine.registerAdapter('local-head', dir)).rejects.toMatchObject(refusesPassthrough);
      await expect(engine.registerAdapter('local-head', dir, { compress: true })).rejects.toMatchObject(refusesPassthrough);
      await expect(collect(engine.generate({ prompt: 'hello', maxNewTokens: 2, ignoreEos: true, adapterId: 'head' })))
        .rejects.toMatchObject({ code: 'ADAPTER_LOAD', message: expect.stringMatching(/SOPPU serves LoRA deltas only/) });
      expect((await collect(engine.generate({ prompt: 'hello', maxNewTokens: 2, ignoreEos: true, adapterId: 'plain' }))).finishReason).toBe('length');
    } finally {
      await engine.close();
    }
  });
});

describe('values beyond f32', () => {
  const SLOT = { path: 'model.layers.0.self_attn.q_proj', inFeatures: 16, outFeatures: 12 };
  const scaled = (module: LoraModule, scale: number, b = module.b): LoraModule => ({ ...module, scale, alpha: scale * module.rank, b });

  it('compress refuses a module whose scale·B overflows f32, writing no bank', async () => {
    const [input] = syntheticAdapterSet({ slots: [SLOT], count: 1, rank: 4, sharedRank: 0, seed: 21 });
    const module = input!.adapter.modules.get(SLOT.path)!;
    const huge = syntheticAdapter(new Map([[SLOT.path, scaled(module, 1e60)]]), null, 4);
    for (const compress of [{ method: 'jd-full' as const }, { method: 'jd-full' as const, rank: 1 }]) {
      const dir = join(root, `bank-alpha-${compress.rank ?? 'budget'}`);
      await expect(compressIntoBank([{ id: 'x', adapter: huge }], dir, { compress })).rejects.toMatchObject({
        code: 'ADAPTER_TENSORS', message: expect.stringMatching(/adapter "x": model\.layers\.0\.self_attn\.q_proj: scale 1e\+60 times the largest \|B\| .* beyond the f32 range \(±3\.4028234663852886e\+38\)/),
      });
      await expect(readdir(dir)).rejects.toMatchObject({ code: 'ENOENT' });
    }
  });

  it('compress refuses a fit whose core is not finite in f32 (ΔW beyond f32) before writing', async () => {
    const [input] = syntheticAdapterSet({ slots: [SLOT], count: 1, rank: 4, sharedRank: 0, seed: 21 });
    const module = input!.adapter.modules.get(SLOT.path)!;
    // scale·B and A are finite in f32, their product is not
    const big = syntheticAdapter(new Map([[SLOT.path, { ...scaled(module, 1, module.b.map((v) => v * 1e36)), a: module.a.map((v) => v * 1e36) }]]), null, 4);
    await expect(compressAdapters([{ id: 'x', adapter: big }], { method: 'jd-full', rank: 1 })).rejects.toMatchObject({
      code: 'ADAPTER_TENSORS', message: expect.stringMatching(/adapter "x": model\.layers\.0\.self_attn\.q_proj: the fit gives a non-finite value/),
    });
  });

  it('residentFromLora refuses a scale·B beyond f32 (it served infinities as f32)', () => {
    const adapter = randomLora(model.config, 4, 4, 8);
    const [path, module] = [...adapter.modules][0]!;
    const huge: LoraAdapter = { ...adapter, modules: new Map([...adapter.modules, [path, { ...module, scale: 1e60 }]]) };
    for (const dtype of ['f32', 'bf16', 'f16'] as const) {
      expect(() => residentFromLora('x', huge, shape, dtype)).toThrow(expect.objectContaining({ code: 'ADAPTER_TENSORS', message: expect.stringMatching(new RegExp(`module ${path.replace(/\./g, '\\.')}: scale 1e\\+60 · lora_B is beyond the f32 range`)) }));
    }
    // within f32 but past bf16's largest value: refused as bf16, served as f32
    const edge: LoraAdapter = { ...adapter, modules: new Map([...adapter.modules, [path, { ...module, scale: 1, b: module.b.map((v, i) => (i === 0 ? 3.4e38 : v)) }]]) };
    expect(() => residentFromLora('x', edge, shape, 'bf16')).toThrow(/beyond the bf16 range/);
    expect(residentFromLora('x', edge, shape, 'f32').slots.size).toBeGreaterThan(0);
  });

  it('export --dtype f16 refuses values beyond ±65504 (it wrote ±Infinity), naming the tensor', async () => {
    const [input] = syntheticAdapterSet({ slots: [SLOT], count: 1, rank: 4, sharedRank: 0, seed: 21 });
    const module = input!.adapter.modules.get(SLOT.path)!;
    const dir = join(root, 'bank-f16');
    await compressIntoBank([{ id: 'x', adapter: syntheticAdapter(new Map([[SLOT.path, scaled(module, 1e7)]]), null, 4) }], dir, { compress: { method: 'jd-full' } });
    const bank = await openBank(dir);
    const out = join(root, 'export-f16');
    await expect(exportAdapter(bank, 'x', out, { dtype: 'f16' })).rejects.toMatchObject({
      code: 'ADAPTER_TENSORS', message: expect.stringMatching(/tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight": value -?\d.* at element \d+ is beyond the f16 range \(±65504\); save as f32 or bf16/),
    });
    await expect(readdir(out)).rejects.toMatchObject({ code: 'ENOENT' });
    await exportAdapter(bank, 'x', join(root, 'export-bf16'), { dtype: 'bf16' });
    expect((await loadLoraAdapter(join(root, 'export-bf16'))).modules.size).toBe(1);
  });
});

describe('rank-deficient adapters', () => {
  it('jd-diag fits an adapter whose ΔW has rank 1 though its r is 8 (the SVD of its noise-only mean core did not converge)', async () => {
    const slots = [0, 1].flatMap((layer) => [
      { path: `model.layers.${layer}.self_attn.q_proj`, inFeatures: 64, outFeatures: 64 },
      { path: `model.layers.${layer}.self_attn.v_proj`, inFeatures: 64, outFeatures: 32 },
    ]);
    const [input] = syntheticAdapterSet({ slots, count: 1, rank: 8, sharedRank: 0, seed: 21 });
    // a partly trained adapter: one column of B moved away from zero
    for (const module of input!.adapter.modules.values()) {
      for (let o = 0; o < module.outFeatures; o++) for (let r = 1; r < module.rank; r++) module.b[o * module.rank + r] = 0;
    }
    for (const method of ['jd-diag', 'jd-full'] as const) {
      const result = await compressAdapters([input!], { method, seed: 1 });
      for (const slot of result.slots) {
        for (const adapter of slot.adapters.values()) {
          // compressed within rounding, or kept exact (raw) where compression would not pay
          if (adapter.storage === 'compressed') expect(adapter.relativeError, `${method} ${slot.path}`).toBeLessThan(1e-6);
        }
      }
      expect(result.slots.some((slot) => [...slot.adapters.values()].some((a) => a.storage === 'compressed'))).toBe(true);
    }
  });
});
