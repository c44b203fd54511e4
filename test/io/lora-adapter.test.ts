import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError, type ErrorCode } from '../../src/errors/soppu-error.js';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { AdapterGenerator, writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { frobeniusNormOfDelta } from '../../src/io/frobenius-norm-of-delta.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import { matchPatternKey, parseLoraConfig } from '../../src/io/lora-config.js';
import type { LoraAdapter, LoraModule } from '../../src/io/lora-types.js';
import { openSafetensors, writeSafetensors } from '../../src/io/safetensors.js';
import type { TensorToWrite } from '../../src/io/safetensors-types.js';
import { saveLoraAdapter } from '../../src/io/save-lora-adapter.js';
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from '../../src/tensor/dtype.js';

let root: string;
let counter = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-lora-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
const freshDir = () => join(root, `a${counter++}`);

function expectSameModules(loaded: LoraAdapter, original: LoraAdapter, round: (x: number) => number = (x) => x): void {
  expect([...loaded.modules.keys()]).toEqual([...original.modules.keys()]);
  for (const [path, m] of original.modules) {
    const l = loaded.modules.get(path)!;
    expect({ ...l, a: null, b: null }).toEqual({ ...m, a: null, b: null });
    expect(Array.from(l.a)).toEqual(Array.from(m.a, round));
    expect(Array.from(l.b)).toEqual(Array.from(m.b, round));
  }
}

/** ‖scale·B·A‖_F computed densely. */
function denseNorm(m: LoraModule): number {
  let sum = 0;
  for (let o = 0; o < m.outFeatures; o++) {
    for (let i = 0; i < m.inFeatures; i++) {
      let v = 0;
      for (let k = 0; k < m.rank; k++) v += m.b[o * m.rank + k]! * m.a[k * m.inFeatures + i]!;
      sum += (m.scale * v) ** 2;
    }
  }
  return Math.sqrt(sum);
}

/** Writes a raw adapter directory. */
async function rawAdapter(config: Record<string, unknown> | string | null, tensors: TensorToWrite[] | null): Promise<string> {
  const dir = freshDir();
  await mkdir(dir, { recursive: true });
  if (config !== null) await writeFile(join(dir, 'adapter_config.json'), typeof config === 'string' ? config : JSON.stringify(config));
  if (tensors !== null) await writeSafetensors(join(dir, 'adapter_model.safetensors'), tensors);
  return dir;
}

const baseConfig = { peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] };
const f32 = (name: string, shape: number[], fill: (i: number) => number = (i) => (i + 1) / 10): TensorToWrite => ({
  name, dtype: 'F32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => fill(i)),
});
const qA = (shape = [2, 3]) => f32('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', shape);
const qB = (shape = [4, 2]) => f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', shape);

async function expectRefusal(dir: string, code: ErrorCode, pattern: RegExp): Promise<void> {
  const error = await loadLoraAdapter(dir).then(() => null, (e: unknown) => e);
  expect(isSoppuError(error, code), `expected ${code}, got ${String(error)}`).toBe(true);
  expect((error as Error).message).toMatch(pattern);
}

describe('PEFT adapter round trip', () => {
  it('tiny q_proj,v_proj f32: save → load is exact; files follow PEFT naming', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 4, seed: 3 }).adapter(0);
    const dir = freshDir();
    await saveLoraAdapter(dir, adapter);
    const loaded = await loadLoraAdapter(dir);
    expectSameModules(loaded, adapter);
    expect(loaded.flags).toEqual([]);
    expect(loaded.sourceDtype).toBe('F32');
    expect([...loaded.modules.keys()]).toEqual([
      'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj',
    ]);
    const v = loaded.modules.get('model.layers.1.self_attn.v_proj')!;
    expect([v.layer, v.module, v.rank, v.inFeatures, v.outFeatures, v.scale]).toEqual([1, 'v_proj', 4, 64, 32, 2]);
    const file = await openSafetensors(join(dir, 'adapter_model.safetensors'));
    expect(file.tensors.map((t) => t.name)).toContain('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');
    expect(file.get('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight')?.shape).toEqual([64, 4]);
    expect(file.metadata).toEqual({ format: 'pt' });
    await file.close();
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(config).toMatchObject({ peft_type: 'LORA', r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'], base_model_name_or_path: 'soppu/tiny', rank_pattern: {}, use_dora: false });
    expect(Object.keys(config)).toEqual([...Object.keys(config)].sort());
  });

  it('bf16 and f16 files load as the rounded factors', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 2, targets: ['o_proj', 'down_proj'], seed: 5, layers: 1 }).adapter(1);
    for (const [dtype, round] of [['bf16', (x: number) => bf16ToF32(f32ToBf16(x))], ['f16', (x: number) => f16ToF32(f32ToF16(x))]] as const) {
      const dir = freshDir();
      await saveLoraAdapter(dir, adapter, { dtype });
      const loaded = await loadLoraAdapter(dir);
      expect(loaded.sourceDtype).toBe(dtype.toUpperCase());
      expectSameModules(loaded, adapter, round);
    }
  });

  it('smollm-135m, llama-7b-shapes and gpt2 shapes (few layers) round-trip', async () => {
    const cases = [
      { base: BASE_SHAPES['smollm-135m'], targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], layers: 1, rank: 4 },
      { base: BASE_SHAPES['llama-7b-shapes'], targets: ['v_proj'], layers: 1, rank: 2 },
      { base: BASE_SHAPES.gpt2, targets: ['c_attn', 'c_proj', 'c_fc'], layers: 1, rank: 2 },
    ];
    for (const options of cases) {
      const adapter = new AdapterGenerator({ ...options, seed: 11 }).adapter(2);
      const dir = freshDir();
      await saveLoraAdapter(dir, adapter);
      const loaded = await loadLoraAdapter(dir);
      expectSameModules(loaded, adapter);
      expect(loaded.flags).toEqual([]);
      expect(loaded.config.layersToTransform).toEqual([0]);
    }
    const gpt2 = await loadLoraAdapter(join(root, `a${counter - 1}`));
    expect([...gpt2.modules.values()].map((m) => [m.path, m.inFeatures, m.outFeatures])).toEqual([
      ['transformer.h.0.attn.c_attn', 768, 2304], ['transformer.h.0.attn.c_proj', 768, 768], ['transformer.h.0.mlp.c_fc', 768, 3072], ['transformer.h.0.mlp.c_proj', 3072, 768],
    ]);
    expect(gpt2.config.fanInFanOut).toBe(true);
  });

  it('key variants: doubled prefix, .default adapter names, rsLoRA', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 4, alpha: 8, rslora: true, seed: 1 }).adapter(0);
    expect(adapter.modules.get('model.layers.0.self_attn.q_proj')!.scale).toBe(4); // 8 / √4
    const dir = freshDir();
    await saveLoraAdapter(dir, adapter, { doubledPrefix: true, adapterName: 'default' });
    const file = await openSafetensors(join(dir, 'adapter_model.safetensors'));
    expect(file.tensors[0]!.name).toMatch(/^base_model\.model\.base_model\.model\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.default\.weight$/);
    await file.close();
    const loaded = await loadLoraAdapter(dir);
    expectSameModules(loaded, adapter);
    expect(loaded.flags).toEqual(['doubled-prefix', 'adapter-name-in-keys']);
    expect(loaded.config.useRslora).toBe(true);
  });

  it('mixed ranks and alphas are saved as rank_pattern / alpha_pattern and reload equal', async () => {
    const one = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 4, alpha: 8, targets: ['q_proj'], seed: 2 }).adapter(0);
    const two = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 2, alpha: 6, targets: ['v_proj'], seed: 2, layers: 1 }).adapter(0);
    const modules = new Map([...one.modules, ...two.modules]);
    const adapter: LoraAdapter = { ...one, modules };
    const dir = freshDir();
    await saveLoraAdapter(dir, adapter);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(config.r).toBe(4);
    expect(config.rank_pattern).toEqual({ 'layers.0.self_attn.v_proj': 2 });
    expect(config.alpha_pattern).toEqual({ 'layers.0.self_attn.v_proj': 6 });
    const loaded = await loadLoraAdapter(dir);
    for (const [path, m] of modules) {
      const l = loaded.modules.get(path)!;
      expect([l.rank, l.alpha, l.scale]).toEqual([m.rank, m.alpha, m.scale]);
      expect(Array.from(l.b)).toEqual(Array.from(m.b));
    }
  });

  it('passthrough tensors (modules_to_save heads, biases) are kept byte for byte', async () => {
    const head = f32('base_model.model.lm_head.weight', [3, 2]);
    const bias = { name: 'base_model.model.model.layers.0.self_attn.q_proj.bias', dtype: 'BF16', shape: [4], data: Uint16Array.from([1, 2, 3, 4]) } as const;
    const dir = await rawAdapter({ ...baseConfig, modules_to_save: ['lm_head'] }, [qA(), qB(), head, bias]);
    const loaded = await loadLoraAdapter(dir);
    expect(loaded.passthrough.map((p) => [p.name, p.dtype, p.shape])).toEqual([
      ['base_model.model.lm_head.weight', 'F32', [3, 2]], ['base_model.model.model.layers.0.self_attn.q_proj.bias', 'BF16', [4]],
    ]);
    expect(Array.from(new Float32Array(loaded.passthrough[0]!.bytes.slice().buffer))).toEqual(Array.from(head.data as Float32Array));
    const again = freshDir();
    await saveLoraAdapter(again, loaded);
    const reloaded = await loadLoraAdapter(again);
    expect(reloaded.passthrough).toEqual(loaded.passthrough);
    expect(reloaded.config.modulesToSave).toEqual(['lm_head']);
  });
});

describe('PEFT config semantics', () => {
  it('rank_pattern and alpha_pattern match a dotted suffix or a regex, first key wins', () => {
    const patterns = { 'layers\\.1\\..*': 16, q_proj: 4, 'self_attn.v_proj': 2 };
    expect(matchPatternKey(patterns, 'model.layers.1.self_attn.q_proj')).toBe('layers\\.1\\..*');
    expect(matchPatternKey(patterns, 'model.layers.0.self_attn.q_proj')).toBe('q_proj');
    expect(matchPatternKey(patterns, 'model.layers.0.self_attn.v_proj')).toBe('self_attn.v_proj');
    expect(matchPatternKey(patterns, 'model.layers.0.self_attn.xq_proj')).toBeNull();
  });

  it('per-module scale follows rank_pattern / alpha_pattern', async () => {
    const config = { ...baseConfig, r: 8, lora_alpha: 16, rank_pattern: { q_proj: 2 }, alpha_pattern: { 'layers.0.self_attn.q_proj': 3 } };
    const loaded = await loadLoraAdapter(await rawAdapter(config, [qA(), qB()]));
    const q = loaded.modules.get('model.layers.0.self_attn.q_proj')!;
    expect([q.rank, q.alpha, q.scale]).toEqual([2, 3, 1.5]);
  });

  it('modules must be matched by target_modules (list or regex) and layers_to_transform', async () => {
    const regex = await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: 'model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj' }, [qA(), qB()]));
    expect(regex.modules.size).toBe(1);
    await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: ['v_proj'] }, [qA(), qB()]), 'ADAPTER_CONFIG', /q_proj has LoRA factors but is not matched by target_modules \["v_proj"\]/);
    await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: 'model.*v_proj' }, [qA(), qB()]), 'ADAPTER_CONFIG', /not matched by target_modules "model\.\*v_proj"/);
    await expectRefusal(await rawAdapter({ ...baseConfig, layers_to_transform: [1] }, [qA(), qB()]), 'ADAPTER_CONFIG', /layer 0 is not in layers_to_transform \[1\]/);
  });

  it('normalises defaults and refuses malformed fields', () => {
    const c = parseLoraConfig({ peft_type: 'LORA', target_modules: 'model.*(q|v)_proj' }, 'x.json');
    expect([c.r, c.loraAlpha, c.useRslora, c.bias, c.layersToTransform, c.targetModules]).toEqual([8, 8, false, 'none', null, 'model.*(q|v)_proj']);
    expect(parseLoraConfig({ peft_type: 'LORA', target_modules: ['q_proj'], layers_to_transform: 3 }, 'x.json').layersToTransform).toEqual([3]);
    expect(() => parseLoraConfig({ peft_type: 'LORA', r: 0 }, 'x.json')).toThrow(/x\.json: r: must be a positive integer/);
    expect(() => parseLoraConfig({ peft_type: 'LORA', target_modules: ['q_proj'], rank_pattern: { '(': 2 } }, 'x.json')).toThrow(/not a valid regular expression/);
    expect(() => parseLoraConfig({ r: 2 }, 'x.json')).toThrow(/peft_type: is missing/);
    expect(() => parseLoraConfig({ peft_type: 'LORA', target_modules: ['q_proj'], bias: 'some' }, 'x.json')).toThrow(/bias: must be/);
  });
});

describe('PEFT adapter refusals', () => {
  it('refuses other peft types, DoRA and LoRA biases', async () => {
    await expectRefusal(await rawAdapter({ ...baseConfig, peft_type: 'IA3' }, [qA(), qB()]), 'ADAPTER_UNSUPPORTED', /peft_type "IA3" is not supported/);
    await expectRefusal(await rawAdapter({ ...baseConfig, use_dora: true }, [qA(), qB()]), 'ADAPTER_UNSUPPORTED', /use_dora is true: DoRA/);
    const magnitude = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector', [4]);
    await expectRefusal(await rawAdapter(baseConfig, [qA(), qB(), magnitude]), 'ADAPTER_UNSUPPORTED', /lora_magnitude_vector" is a DoRA magnitude vector/);
    const embedding = f32('base_model.model.model.embed_tokens.lora_embedding_A', [2, 10]);
    await expectRefusal(await rawAdapter(baseConfig, [qA(), qB(), embedding]), 'ADAPTER_UNSUPPORTED', /embedding LoRA factor: LoRA on embedding layers is not supported/);
    const loraBias = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias', [4]);
    await expectRefusal(await rawAdapter(baseConfig, [qA(), qB(), loraBias]), 'ADAPTER_UNSUPPORTED', /lora_bias/);
  });

  it('refuses what PEFT would apply differently from a plain LoRA: PiSSA/OLoRA/LoftQ/CorDA inits, activated LoRA, replicated layers, no target_modules', async () => {
    for (const init of ['pissa', 'pissa_niter_16', 'olora', 'loftq', 'corda']) {
      await expectRefusal(await rawAdapter({ ...baseConfig, init_lora_weights: init }, [qA(), qB()]), 'ADAPTER_UNSUPPORTED', new RegExp(`init_lora_weights "${init}" changes the base model when PEFT loads the adapter; convert it to a plain LoRA first`));
    }
    for (const init of [true, false, 'gaussian', 'eva']) await loadLoraAdapter(await rawAdapter({ ...baseConfig, init_lora_weights: init }, [qA(), qB()]));
    // written back, the factors are final: no init (false would give modules a widened target list adds random factors in PEFT)
    const saved = freshDir();
    await saveLoraAdapter(saved, await loadLoraAdapter(await rawAdapter({ ...baseConfig, init_lora_weights: false }, [qA(), qB()])));
    expect(JSON.parse(await readFile(join(saved, 'adapter_config.json'), 'utf8'))).not.toHaveProperty('init_lora_weights');
    await expectRefusal(await rawAdapter({ ...baseConfig, alora_invocation_tokens: [128006, 78191] }, [qA(), qB()]), 'ADAPTER_UNSUPPORTED', /alora_invocation_tokens is set: activated LoRA/);
    await expectRefusal(await rawAdapter({ ...baseConfig, layer_replication: [[0, 1], [0, 1]] }, [qA(), qB()]), 'ADAPTER_UNSUPPORTED', /layer_replication is set: replicated layers/);
    await loadLoraAdapter(await rawAdapter({ ...baseConfig, alora_invocation_tokens: null, layer_replication: null }, [qA(), qB()]));
    for (const target_modules of [null, []]) {
      await expectRefusal(await rawAdapter({ ...baseConfig, target_modules }, [qA(), qB()]), 'ADAPTER_CONFIG', /target_modules: is missing or empty/);
    }
  });

  it("takes a negative or zero lora_alpha as PEFT does (it negates or silences the adapter); 'all-linear' leaves lm_head out", async () => {
    const negative = await loadLoraAdapter(await rawAdapter({ ...baseConfig, lora_alpha: -4, alpha_pattern: { q_proj: -2 } }, [qA(), qB()]));
    expect(negative.modules.get('model.layers.0.self_attn.q_proj')!.scale).toBe(-1); // alpha_pattern's -2 over r = 2
    expect((await loadLoraAdapter(await rawAdapter({ ...baseConfig, lora_alpha: 0 }, [qA(), qB()]))).modules.get('model.layers.0.self_attn.q_proj')!.scale).toBe(0);
    const head = [f32('base_model.model.lm_head.lora_A.weight', [2, 3]), f32('base_model.model.lm_head.lora_B.weight', [5, 2])];
    await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: 'all-linear' }, [qA(), qB(), ...head]), 'ADAPTER_CONFIG', /lm_head.*target_modules/);
    expect([...(await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: 'all-linear' }, [qA(), qB()]))).modules.keys()]).toEqual(['model.layers.0.self_attn.q_proj']);
  });

  it('refuses missing or malformed files', async () => {
    await expectRefusal(join(root, 'does-not-exist'), 'FILE_NOT_FOUND', /adapter directory does not exist/);
    await expectRefusal(await rawAdapter(null, [qA(), qB()]), 'ADAPTER_CONFIG', /adapter_config\.json: missing/);
    await expectRefusal(await rawAdapter('{"peft_type": ', [qA(), qB()]), 'ADAPTER_CONFIG', /adapter_config\.json: not valid JSON/);
    await expectRefusal(await rawAdapter(baseConfig, null), 'ADAPTER_TENSORS', /adapter_model\.safetensors: missing/);
    const pickle = await rawAdapter(baseConfig, null);
    await writeFile(join(pickle, 'adapter_model.bin'), 'PK');
    await expectRefusal(pickle, 'ADAPTER_UNSUPPORTED', /only adapter_model\.bin \(a pickle\) is present/);
    await expectRefusal(await rawAdapter(baseConfig, [f32('base_model.model.lm_head.weight', [2])]), 'ADAPTER_TENSORS', /holds no LoRA factors/);
  });

  it('refuses unpaired factors, rank disagreements, bad dtypes and non-finite values', async () => {
    await expectRefusal(await rawAdapter(baseConfig, [qA()]), 'ADAPTER_TENSORS', /q_proj has lora_A .* but no lora_B/);
    await expectRefusal(await rawAdapter(baseConfig, [qB()]), 'ADAPTER_TENSORS', /q_proj has lora_B .* but no lora_A/);
    await expectRefusal(await rawAdapter(baseConfig, [qA([2, 3]), qB([4, 3])]), 'ADAPTER_TENSORS', /A \[2, 3\] and B \[4, 3\] disagree on the rank/);
    await expectRefusal(await rawAdapter(baseConfig, [qA([3, 5]), qB([4, 3])]), 'ADAPTER_TENSORS', /has rank 3 .* but the config says r=2/);
    await expectRefusal(await rawAdapter({ ...baseConfig, rank_pattern: { q_proj: 5 } }, [qA(), qB()]), 'ADAPTER_TENSORS', /rank 2 .* config says r=5 \(from rank_pattern\)/);
    const int = { name: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', dtype: 'I32', shape: [2, 3], data: new Int32Array(6) } as const;
    await expectRefusal(await rawAdapter(baseConfig, [int, qB()]), 'ADAPTER_TENSORS', /dtype I32; LoRA factors must be/);
    const nan = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', [4, 2], (i) => (i === 5 ? NaN : 1));
    await expectRefusal(await rawAdapter(baseConfig, [qA(), nan]), 'ADAPTER_TENSORS', /lora_B\.weight" holds a non-finite value \(NaN\) at element 5/);
    const overflow = { name: 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', dtype: 'F16', shape: [2, 3], data: Uint16Array.from([0x3c00, 0x7c00, 0, 0, 0, 0]) } as const;
    await expectRefusal(await rawAdapter(baseConfig, [overflow, qB()]), 'ADAPTER_TENSORS', /non-finite value \(Infinity\) at element 1/);
    const dup = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight', [2, 3]);
    await expectRefusal(await rawAdapter(baseConfig, [qA(), dup, qB()]), 'ADAPTER_TENSORS', /are both lora_A of module/);
  });
});

describe('zero deltas and fan_in_fan_out', () => {
  it('takes factor keys that name the adapter (lora_A.default.weight, a PEFT model\'s state_dict) and flags them: PEFT loading such a file finds no factor', async () => {
    const a = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight', [2, 3]);
    const b = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight', [4, 2]);
    const named = await loadLoraAdapter(await rawAdapter(baseConfig, [a, b]));
    expect(named.flags).toEqual(['adapter-name-in-keys']);
    expect([...named.modules.keys()]).toEqual(['model.layers.0.self_attn.q_proj']);
    expect((await loadLoraAdapter(await rawAdapter(baseConfig, [qA(), qB()]))).flags).toEqual([]);
  });

  it('flags zero modules and all-zero adapters but loads them', async () => {
    const zeroB = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', [4, 2], () => 0);
    const vA = f32('base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight', [2, 3]);
    const vB = f32('base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight', [4, 2]);
    const some = await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: ['q_proj', 'v_proj'] }, [qA(), zeroB, vA, vB]));
    expect(some.flags).toEqual(['zero-modules']);
    expect(frobeniusNormOfDelta(some.modules.get('model.layers.0.self_attn.q_proj')!)).toBe(0);
    const all = await loadLoraAdapter(await rawAdapter(baseConfig, [qA(), zeroB]));
    expect(all.flags).toEqual(['all-zero']);
  });

  it('GPT-2 Conv1D: transposed factors are detected by shape; wrong fan_in_fan_out is flagged', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.gpt2, rank: 2, layers: 1, seed: 4 }).adapter(0);
    // PEFT layout with the right config: no flag.
    const standard = freshDir();
    await saveLoraAdapter(standard, adapter);
    expect((await loadLoraAdapter(standard)).flags).toEqual([]);
    // Transposed storage, config fan_in_fan_out true: transposed back, no flag.
    const transposed = freshDir();
    await saveLoraAdapter(transposed, adapter, { transposeFactors: true });
    const t = await loadLoraAdapter(transposed);
    expectSameModules(t, adapter);
    expect(t.flags).toEqual([]);
    // Config says fan_in_fan_out false on Conv1D modules: loaded by shape, flagged.
    const wrongConfig: LoraAdapter = { ...adapter, config: parseLoraConfig({ ...adapter.config.raw, fan_in_fan_out: false }, 'x') };
    const wrong = freshDir();
    await saveLoraAdapter(wrong, wrongConfig, { transposeFactors: true });
    const w = await loadLoraAdapter(wrong);
    expectSameModules(w, adapter);
    expect(w.flags).toEqual(['fan-in-fan-out-mismatch']);
  });

  it('a Linear module whose factors fit PEFT\'s layout at another rank is refused by its rank, not read transposed', async () => {
    // A [2, 4], B [4, 2] with r=4: PEFT's [r, in] / [out, r] at rank 2; transposed they would be a 2×2 layer of rank 4
    const a = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', [2, 4]);
    const b = f32('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', [4, 2]);
    await expectRefusal(await rawAdapter({ ...baseConfig, r: 4 }, [a, b]), 'ADAPTER_TENSORS', /q_proj has rank 2 \(A \[2, 4\], B \[4, 2\]\) but the config says r=4/);
  });
});

describe('frobeniusNormOfDelta', () => {
  it('equals the dense ‖scale·B·A‖_F', () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 5, alpha: 3, targets: ['q_proj', 'down_proj'], seed: 9, layers: 1 }).adapter(0);
    for (const m of adapter.modules.values()) {
      const dense = denseNorm(m);
      expect(Math.abs(frobeniusNormOfDelta(m) - dense)).toBeLessThan(1e-9 + 1e-5 * dense);
    }
    const negative = { ...adapter.modules.get('model.layers.0.self_attn.q_proj')!, scale: -0.5 };
    expect(frobeniusNormOfDelta(negative)).toBeCloseTo(denseNorm(negative), 6);
  });
});

describe('adapter generator', () => {
  it('is deterministic and independent of the count; delta RMS follows deltaStd', async () => {
    const generator = new AdapterGenerator({ base: BASE_SHAPES.tiny, seed: 42, deltaStd: 0.05 });
    const again = new AdapterGenerator({ base: BASE_SHAPES.tiny, seed: 42, deltaStd: 0.05 });
    const q = generator.adapter(3).modules.get('model.layers.0.self_attn.q_proj')!;
    expect(Array.from(again.adapter(3).modules.get('model.layers.0.self_attn.q_proj')!.a)).toEqual(Array.from(q.a));
    expect(Array.from(generator.adapter(4).modules.get('model.layers.0.self_attn.q_proj')!.a)).not.toEqual(Array.from(q.a));
    const rms = frobeniusNormOfDelta(q) / Math.sqrt(q.inFeatures * q.outFeatures);
    expect(rms).toBeGreaterThan(0.035);
    expect(rms).toBeLessThan(0.07);
    const one = await writeGeneratedAdapters(freshDir(), 2, { base: BASE_SHAPES.tiny, seed: 1 });
    const two = await writeGeneratedAdapters(freshDir(), 3, { base: BASE_SHAPES.tiny, seed: 1 });
    expect(one.map((d) => d.slice(-9))).toEqual(['user-0000', 'user-0001']);
    expect(await readFile(join(one[1]!, 'adapter_model.safetensors'))).toEqual(await readFile(join(two[1]!, 'adapter_model.safetensors')));
    // a deltaStd past f32's range is refused, not written as infinities every reader then refuses
    expect(() => new AdapterGenerator({ base: BASE_SHAPES.tiny, seed: 1, deltaStd: 1e308 }).adapter(0)).toThrow(/deltaStd 1e\+308 gives B entries of RMS .*, past f32's range/);
  });

  it('shared rank K plants a common subspace: deltas of two adapters share column space', () => {
    const shared = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 8, sharedRank: 2, noise: 0.01, targets: ['q_proj'], layers: 1, seed: 7 });
    const independent = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 8, sharedRank: 0, targets: ['q_proj'], layers: 1, seed: 7 });
    // Energy of B₂ outside span(B₁'s top-2 left singular vectors) is small only with sharing.
    const residual = (g: AdapterGenerator): number => {
      const b1 = g.adapter(0).modules.get('model.layers.0.self_attn.q_proj')!.b;
      const b2 = g.adapter(1).modules.get('model.layers.0.self_attn.q_proj')!.b;
      const basis = topLeftSingularVectors(b1, 64, 8, 2);
      let total = 0;
      let outside = 0;
      for (let c = 0; c < 8; c++) {
        const col = Array.from({ length: 64 }, (_, r) => b2[r * 8 + c]!);
        const projection = new Array<number>(64).fill(0);
        for (const u of basis) {
          const dot = u.reduce((s, x, i) => s + x * col[i]!, 0);
          u.forEach((x, i) => (projection[i] = projection[i]! + dot * x));
        }
        col.forEach((x, i) => {
          total += x * x;
          outside += (x - projection[i]!) ** 2;
        });
      }
      return outside / total;
    };
    expect(residual(shared)).toBeLessThan(0.01);
    expect(residual(independent)).toBeGreaterThan(0.5);
  });

  it('refuses unknown targets and bad ranks', () => {
    expect(() => new AdapterGenerator({ base: BASE_SHAPES.tiny, targets: ['c_attn'] })).toThrow(/target module "c_attn" does not exist in tiny/);
    expect(() => new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 100 })).toThrow(/rank 100 exceeds/);
    expect(() => new AdapterGenerator({ base: BASE_SHAPES.tiny, layers: 3 })).toThrow(/layers must be between 1 and 2/);
  });
});

/** Top-k left singular vectors of x [rows, cols] by power iteration on x·xᵀ with deflation. */
function topLeftSingularVectors(x: Float32Array, rows: number, cols: number, k: number): number[][] {
  const gram = Array.from({ length: rows }, (_, i) => Array.from({ length: rows }, (_, j) => {
    let s = 0;
    for (let c = 0; c < cols; c++) s += x[i * cols + c]! * x[j * cols + c]!;
    return s;
  }));
  const vectors: number[][] = [];
  for (let v = 0; v < k; v++) {
    let u = Array.from({ length: rows }, (_, i) => Math.sin(i + v + 1));
    for (let it = 0; it < 300; it++) {
      for (const w of vectors) {
        const dot = w.reduce((s, a, i) => s + a * u[i]!, 0);
        u = u.map((a, i) => a - dot * w[i]!);
      }
      const next = gram.map((row) => row.reduce((s, a, j) => s + a * u[j]!, 0));
      const norm = Math.hypot(...next);
      u = next.map((a) => a / norm);
    }
    vectors.push(u);
  }
  return vectors;
}
