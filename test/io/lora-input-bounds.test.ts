/**
 * Hostile or unusual PEFT adapters: zero-sized factors, an f32-overflowing lora_alpha, deep or huge
 * configs, catastrophic regexes, exclude_modules and PEFT's layers_to_transform rules, f16 export.
 */
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError, type ErrorCode, type SoppuError } from '../../src/errors/soppu-error.js';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { AdapterGenerator } from '../../src/io/fixtures/generate-adapters.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import { hasNestedQuantifier, moduleRankAndAlpha, moduleTargeting, parseLoraConfig } from '../../src/io/lora-config.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';
import { openSafetensors, writeSafetensors } from '../../src/io/safetensors.js';
import type { TensorToWrite } from '../../src/io/safetensors-types.js';
import { saveLoraAdapter } from '../../src/io/save-lora-adapter.js';

let root: string;
let counter = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-lora-bounds-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
const freshDir = () => join(root, `a${counter++}`);

async function rawAdapter(config: Record<string, unknown> | string, tensors: TensorToWrite[]): Promise<string> {
  const dir = freshDir();
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'adapter_config.json'), typeof config === 'string' ? config : JSON.stringify(config));
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), tensors);
  return dir;
}

const baseConfig = { peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] };
const Q = 'model.layers.0.self_attn.q_proj';
const f32 = (name: string, shape: number[], fill: (i: number) => number = (i) => (i + 1) / 10): TensorToWrite => ({
  name, dtype: 'F32', shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => fill(i)),
});
const factors = (path = Q, a = [2, 3], b = [4, 2]) => [f32(`base_model.model.${path}.lora_A.weight`, a), f32(`base_model.model.${path}.lora_B.weight`, b)];

async function refusal(dir: string): Promise<Error> {
  const error = await loadLoraAdapter(dir).then(() => null, (e: unknown) => e);
  expect(error, 'expected a refusal').toBeInstanceOf(Error);
  return error as Error;
}

async function expectRefusal(dir: string, code: ErrorCode, pattern: RegExp): Promise<Error> {
  const error = await refusal(dir);
  expect(isSoppuError(error, code), `expected ${code}, got ${String(error)}`).toBe(true);
  expect(error.message).toMatch(pattern);
  return error;
}

describe('factor shapes and scale', () => {
  it('refuses zero-sized factors naming the tensor (a bank cannot hold 0 features)', async () => {
    await expectRefusal(await rawAdapter(baseConfig, factors(Q, [2, 0], [4, 2])), 'ADAPTER_TENSORS', /q_proj\.lora_A\.weight" has shape \[2, 0\]; rank, in and out features must be at least 1/);
    await expectRefusal(await rawAdapter(baseConfig, factors(Q, [2, 3], [0, 2])), 'ADAPTER_TENSORS', /q_proj\.lora_B\.weight" has shape \[0, 2\]/);
    await expectRefusal(await rawAdapter(baseConfig, factors(Q, [0, 3], [4, 0])), 'ADAPTER_TENSORS', /lora_A\.weight" has shape \[0, 3\]/);
  });

  it('refuses a lora_alpha whose scale·B overflows f32, naming the module and the limit', async () => {
    const error = await expectRefusal(await rawAdapter({ ...baseConfig, lora_alpha: 1e60 }, factors()), 'ADAPTER_TENSORS',
      /module model\.layers\.0\.self_attn\.q_proj: scale 5e\+59 \(lora_alpha 1e\+60\) times the largest \|lora_B\| 0\.8\d* is .* beyond the f32 range \(±3\.4028234663852886e\+38\)/);
    expect((error as SoppuError).context).toMatchObject({ tensor: `base_model.model.${Q}.lora_B.weight`, limit: 3.4028234663852886e38 });
    // large but representable still loads
    const big = await loadLoraAdapter(await rawAdapter({ ...baseConfig, lora_alpha: 1e30 }, factors()));
    expect(big.modules.get(Q)!.scale).toBe(5e29);
  });
});

describe('adapter_config.json bounds', () => {
  const deep = (depth: number) => `${'['.repeat(depth)}${']'.repeat(depth)}`;

  it('refuses deep nesting (a RangeError once the raw config was serialised) naming the field and limit', async () => {
    const text = `{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"notes":${deep(10_000)}}`;
    const error = await expectRefusal(await rawAdapter(text, factors()), 'ADAPTER_CONFIG', /adapter_config\.json: notes: nests deeper than 64 levels \(limit 64\)/);
    expect((error as SoppuError).context).toMatchObject({ field: 'notes', limit: 64 });
    expect(() => parseLoraConfig({ ...baseConfig, notes: { a: JSON.parse(deep(63)) } }, 'x.json')).toThrow(/x\.json: notes: nests deeper than 64 levels/);
    // 64 levels in all (root, notes, 62 arrays) is still fine
    expect(parseLoraConfig({ ...baseConfig, notes: JSON.parse(deep(63)) }, 'x.json').raw['notes']).toBeDefined();
  });

  it('refuses a config file over 4 MiB before reading it (JSON.parse of a large nested file can take the heap)', async () => {
    const text = `{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"notes":"${'x'.repeat(4 * 1024 * 1024)}"}`;
    const error = await expectRefusal(await rawAdapter(text, factors()), 'ADAPTER_CONFIG', /adapter_config\.json: \d+ bytes, more than an adapter config may have \(limit 4194304\)/);
    expect((error as SoppuError).context).toMatchObject({ limit: 4194304 });
  });

  it('refuses a config with too many values', () => {
    expect(() => parseLoraConfig({ ...baseConfig, notes: new Array(200_000).fill(0) }, 'x.json')).toThrow(/x\.json: notes: the config holds more than 100000 JSON values \(limit 100000\)/);
  });
});

describe('regular expressions in the config', () => {
  it('takes nested quantifiers, which PEFT configs write ((\\w+\\.)+), and matches them in linear time', async () => {
    const path = 'base_model.model.model.layers.10.self_attn.q_proj';
    const started = Date.now();
    for (const pattern of ['(.*)*X', '((q)+_proj)+', '(?:x*){2,}y', '(model\\.)?(layers\\.\\d+\\.)+self_attn\\.q_proj']) {
      const config = parseLoraConfig({ ...baseConfig, target_modules: pattern }, 'x.json');
      expect(moduleTargeting(config, path.repeat(3)).targeted, pattern).toBe(false);
    }
    expect(moduleTargeting(parseLoraConfig({ ...baseConfig, target_modules: '(?:\\w+\\.)+q_proj' }, 'x.json'), path).targeted).toBe(true);
    expect(moduleRankAndAlpha(parseLoraConfig({ ...baseConfig, rank_pattern: { '(a+)+': 2 } }, 'x.json'), `${'a'.repeat(40)}!`).rank).toBe(baseConfig.r);
    expect(Date.now() - started).toBeLessThan(5000);
  });

  it('refuses nested quantifiers V8\'s linear-time engine cannot run (a bounded repeat, a backreference, a lookaround: no fallback for those) at once, naming the field', async () => {
    const started = Date.now();
    await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: '(?P<g>a+)+(?P=g)' }, factors()), 'ADAPTER_CONFIG', /target_modules: regular expression .* repeats a group that itself holds a quantifier .* linear-time engine cannot run/);
    // a bounded repeat inside a repeated group: 8 s on one module path, minutes on a longer one, before it was refused
    expect(() => parseLoraConfig({ ...baseConfig, alpha_pattern: { '([\\w.]{1,20})+x': 32 } }, 'x.json')).toThrow(/alpha_pattern.*repeats a group .* bounded repeat/);
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: '(\\w{1,20})+q_proj' }, 'x.json')).toThrow(/target_modules: regular expression/);
    // a ] first in a class does not end it: the ) inside is no group's end (the scan read this as no nesting; 60 s)
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: '([]).\\w]{1,20})+x' }, 'x.json')).toThrow(/target_modules: regular expression .* repeats a group/);
    expect(hasNestedQuantifier('([]).\\w]{1,20})+x')).toBe(true);
    // a bound's digits however many (a 32-character window missed this one, which then hung)
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: `([\\w.]{${'0'.repeat(29)}1,20})+x` }, 'x.json')).toThrow(/target_modules: regular expression .* repeats a group/);
    // stacked wildcards beside a lookaround (no linear-time fallback): polynomial, 1.2 s at seven
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: `(?=b)${'.*'.repeat(7)}x` }, 'x.json')).toThrow(/more than 4 quantifiers/);
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: `(?=b)${'.?'.repeat(40)}x` }, 'x.json')).toThrow(/more than 4 quantifiers/);
    expect(() => parseLoraConfig({ ...baseConfig, alpha_pattern: { '(?=q).*.*.*_proj': 8 } }, 'x.json')).toThrow(/alpha_pattern.*more than 4 quantifiers/);
    // a repeated group whose alternatives overlap, beside a lookaround: exponential without a quantifier inside
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: '(?=b)([\\w.]|[\\w.])*x' }, 'x.json')).toThrow(/repeats a group beside a backreference, lookaround or bounded repeat/);
    const lookahead = parseLoraConfig({ ...baseConfig, target_modules: '^(?!.*vision).*(q_proj|v_proj)$' }, 'x.json');
    expect(moduleTargeting(lookahead, 'base_model.model.model.layers.10.self_attn.q_proj').targeted).toBe(true);
    expect(Date.now() - started).toBeLessThan(5000);
    expect(() => parseLoraConfig({ ...baseConfig, rank_pattern: { '(a+)+\\1': 2 } }, 'x.json')).toThrow(/rank_pattern\["\(a\+\)\+\\\\1"\]: regular expression .* repeats a group/);
    expect(() => parseLoraConfig({ ...baseConfig, exclude_modules: '((q)+_proj)+(?=x)' }, 'x.json')).toThrow(/exclude_modules: regular expression/);
    expect(() => parseLoraConfig({ ...baseConfig, layers_to_transform: [0], layers_pattern: '(h*)+(?!y)' }, 'x.json')).toThrow(/layers_pattern\[0\]: regular expression/);
  });

  it('reads Python regex syntax as Python does: \\A and \\Z anchor, (?P<name>…) names a group; an escape JavaScript would read as a letter is refused', () => {
    const q = 'base_model.model.model.layers.0.self_attn.q_proj';
    const alpha = (pattern: Record<string, number>) => moduleRankAndAlpha(parseLoraConfig({ ...baseConfig, alpha_pattern: pattern }, 'x.json'), q).alpha;
    expect(alpha({ 'q_proj\\Z': 32 })).toBe(32); // PEFT: re.match(r"(.*\.)?(q_proj\Z)$", path) matches
    expect(alpha({ '\\Aq_proj': 32 })).toBe(baseConfig.lora_alpha); // the anchor: q_proj must start the matched suffix's group… and the path
    expect(moduleTargeting(parseLoraConfig({ ...baseConfig, target_modules: '\\A.*(?P<kind>q|v)_proj\\Z' }, 'x.json'), q).targeted).toBe(true);
    expect(moduleTargeting(parseLoraConfig({ ...baseConfig, target_modules: '.*(?P<k>[qv])_pro(?P=k)?j' }, 'x.json'), q).targeted).toBe(true);
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: '.*\\q_proj' }, 'x.json')).toThrow(/target_modules: regular expression .* uses the escape \\q, which JavaScript reads as the letter q/);
    // a ] first in a class is a literal in Python (JavaScript read [] as an empty class and [^] as any character)
    const bracket = (pattern: string, path: string) => moduleRankAndAlpha(parseLoraConfig({ ...baseConfig, alpha_pattern: { [pattern]: 32 } }, 'x.json'), path).alpha;
    expect([bracket('q_proj[]x]', 'm.q_proj]'), bracket('q_proj[]x]', 'm.q_projx'), bracket('q_pro[^]]', 'm.q_proj'), bracket('q_pro[^]]', 'm.q_pro]')]).toEqual([32, 32, 32, baseConfig.lora_alpha]);
    // Python's {,n} is a bound from 0 (JavaScript read it as text)
    expect([bracket('q_pro(j){,1}', 'm.q_proj'), bracket('q_pro(j){,1}', 'm.q_pro')]).toEqual([32, 32]);
    // however long its digits (a 24-character window left {,0000…01} as text)
    expect([bracket(`q_pro(j){,${'0'.repeat(25)}1}`, 'm.q_proj'), bracket(`q_pro(j){,${'0'.repeat(25)}1}`, 'm.q_pro')]).toEqual([32, 32]);
  });

  it('matches in linear time what backtracks without nested quantifiers (adjacent wildcards, overlapping alternatives)', () => {
    const path = 'base_model.model.model.layers.10.self_attn.q_proj';
    // 14 adjacent .*: ~70 s at 12 on V8's backtracking engine, ×3.5 per one more
    for (const pattern of [`${'.*'.repeat(14)}q_proj_x`, '(?:a|aa)+b', `(?:${'.*'.repeat(14)}q_proj)`]) {
      const config = parseLoraConfig({ ...baseConfig, target_modules: pattern }, 'x.json');
      expect(moduleTargeting(config, pattern.endsWith('b') ? 'a'.repeat(60) : path).targeted, pattern).toBe(pattern.endsWith('q_proj)'));
    }
  });

  it('refuses patterns longer than 1024 characters', () => {
    expect(() => parseLoraConfig({ ...baseConfig, target_modules: 'q'.repeat(1025) }, 'x.json')).toThrow(/target_modules: regular expression is 1025 characters \(limit 1024\)/);
    expect(parseLoraConfig({ ...baseConfig, target_modules: 'q'.repeat(1024) }, 'x.json').targetModules).toHaveLength(1024);
  });

  it('keeps ordinary PEFT regexes', async () => {
    for (const pattern of ['.*\\.(q_proj|v_proj)', 'model.layers.\\d+.self_attn.(q|k|v)_proj', '.*\\.(self_attn|encoder_attn)\\.(q_proj|v_proj)$',
      '(.*\\.)?q_proj', 'model\\.layers\\.\\d{1,3}\\.self_attn\\.[qkv]_proj', '.*(?:layers\\.(0|1))\\..*q_proj']) {
      expect(hasNestedQuantifier(pattern), pattern).toBe(false);
      const loaded = await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: pattern }, factors()));
      expect([...loaded.modules.keys()], pattern).toEqual([Q]);
    }
    for (const pattern of ['(a+)+', '(.*)*', '(x*)+', '(a|b*){3}', '((a)?)+', '(a+?)*?']) expect(hasNestedQuantifier(pattern), pattern).toBe(true);
    for (const pattern of ['(a+)?', '(a+){1}', '[(a+)+]', '\\(a+\\)+', '(a)+(b)*']) expect(hasNestedQuantifier(pattern), pattern).toBe(false);
  });
});

describe('PEFT module selection', () => {
  it('exclude_modules is checked first: a list entry equal to the path or a dotted suffix, or a regex full match', async () => {
    for (const exclude of [[Q], ['self_attn.q_proj'], ['q_proj'], 'model\\.layers\\.0\\..*']) {
      await expectRefusal(await rawAdapter({ ...baseConfig, exclude_modules: exclude }, factors()), 'ADAPTER_CONFIG',
        new RegExp(`module model\\.layers\\.0\\.self_attn\\.q_proj has LoRA factors but is excluded by exclude_modules ${JSON.stringify(exclude).replace(/[\\[\].*]/g, (c) => `\\${c}`)}`));
    }
    // neither a partial name nor a regex matching only part of the path excludes
    for (const exclude of [['_proj'], ['layers.1.self_attn.q_proj'], 'q_proj', 'layers\\.0.*']) {
      const loaded = await loadLoraAdapter(await rawAdapter({ ...baseConfig, exclude_modules: exclude }, factors()));
      expect([...loaded.modules.keys()], JSON.stringify(exclude)).toEqual([Q]);
    }
    expect(() => parseLoraConfig({ ...baseConfig, exclude_modules: [1] }, 'x.json')).toThrow(/exclude_modules: must be a list of module names or a regular expression/);
  });

  it('layers_to_transform narrows only a suffix match, not a list entry naming the whole path; with a string target_modules it is refused, as PEFT refuses it', async () => {
    const exact = await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: [Q], layers_to_transform: [1] }, factors()));
    expect([...exact.modules.keys()]).toEqual([Q]);
    await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: ['self_attn.q_proj'], layers_to_transform: [1] }, factors()), 'ADAPTER_CONFIG', /layer 0 is not in layers_to_transform \[1\]/);
    // LoraConfig.__post_init__: a string target_modules (a regex, or "all-linear") takes neither layers_to_transform nor layers_pattern
    for (const target of ['.*q_proj', 'all-linear', 'ALL-LINEAR']) {
      await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: target, layers_to_transform: [1] }, factors()), 'ADAPTER_CONFIG', /layers_to_transform: cannot be used when target_modules is a string/);
      await expectRefusal(await rawAdapter({ ...baseConfig, target_modules: target, layers_pattern: 'layers' }, factors()), 'ADAPTER_CONFIG', /layers_pattern: cannot be used when target_modules is a string/);
    }
    await expectRefusal(await rawAdapter({ ...baseConfig, layers_pattern: 'layers' }, factors()), 'ADAPTER_CONFIG', /layers_pattern: is given without layers_to_transform/);
    // "all-linear" in any case, as PEFT lowercases it
    expect((await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: 'ALL-Linear' }, factors()))).config.targetModules).toBe('all-linear');
    // an empty list transforms every layer
    expect((await loadLoraAdapter(await rawAdapter({ ...baseConfig, layers_to_transform: [] }, factors()))).modules.size).toBe(1);
  });

  it('the layer index is PEFT\'s: the last ".<name>.<digits>." by default, or the one after layers_pattern', () => {
    const moe = 'model.layers.0.block_sparse_moe.experts.3.w1';
    const config = (extra: Record<string, unknown>) => parseLoraConfig({ ...baseConfig, target_modules: ['w1'], ...extra }, 'x.json');
    expect(moduleTargeting(config({ layers_to_transform: [0] }), moe)).toEqual({ targeted: false, field: 'layers_to_transform', layer: 3 });
    expect(moduleTargeting(config({ layers_to_transform: [3] }), moe)).toEqual({ targeted: true });
    expect(moduleTargeting(config({ layers_to_transform: [0], layers_pattern: 'layers' }), moe)).toEqual({ targeted: true });
    expect(moduleTargeting(config({ layers_to_transform: [0], layers_pattern: ['blocks', 'layers'] }), moe)).toEqual({ targeted: true });
    expect(moduleTargeting(config({ layers_to_transform: [0], layers_pattern: 'h' }), moe)).toEqual({ targeted: false, field: 'layers_to_transform', layer: null });
  });

  it('an adapter loaded with a regex target saves a config that reloads', async () => {
    const loaded = await loadLoraAdapter(await rawAdapter({ ...baseConfig, target_modules: '.*q_proj' }, factors()));
    const dir = freshDir();
    await saveLoraAdapter(dir, loaded);
    const again = await loadLoraAdapter(dir);
    expect([...again.modules.keys()]).toEqual([Q]);
    expect([again.config.targetModules, again.config.layersToTransform, again.config.layersPattern]).toEqual([['q_proj'], null, null]);
    // a list target keeps its layers_to_transform
    const kept = await loadLoraAdapter(await rawAdapter({ ...baseConfig, layers_to_transform: [0] }, factors()));
    const keptDir = freshDir();
    await saveLoraAdapter(keptDir, kept);
    expect((await loadLoraAdapter(keptDir)).config.layersToTransform).toEqual([0]);
  });
});

describe('saving as f16', () => {
  it('refuses values beyond ±65504 naming the tensor and the limit, writing nothing', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 2, targets: ['q_proj'], layers: 1, seed: 5 }).adapter(0);
    const q = adapter.modules.get(Q)!;
    const b = Float32Array.from(q.b);
    b[3] = -70000;
    const big: LoraAdapter = { ...adapter, modules: new Map([[Q, { ...q, b }]]) };
    const dir = freshDir();
    await expect(saveLoraAdapter(dir, big, { dtype: 'f16' })).rejects.toMatchObject({
      code: 'ADAPTER_TENSORS',
      message: expect.stringMatching(/tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight": value -70000 at element 3 is beyond the f16 range \(±65504\)/),
      context: expect.objectContaining({ tensor: `base_model.model.${Q}.lora_B.weight`, limit: 65504 }),
    });
    await expect(readdir(dir)).rejects.toMatchObject({ code: 'ENOENT' });
    // the same adapter saves as bf16; 65504 itself fits f16
    await saveLoraAdapter(freshDir(), big, { dtype: 'bf16' });
    // 65510 rounds to 65504 (finite); from 65520 on f16 rounds to Infinity
    b[3] = 65519;
    await saveLoraAdapter(freshDir(), big, { dtype: 'f16' });
    b[3] = 65520;
    await expect(saveLoraAdapter(freshDir(), big, { dtype: 'f16' })).rejects.toMatchObject({ code: 'ADAPTER_TENSORS' });
    b[3] = 65504;
    const edge = freshDir();
    await saveLoraAdapter(edge, big, { dtype: 'f16' });
    const file = await openSafetensors(join(edge, 'adapter_model.safetensors'));
    expect((await file.readF32(`base_model.model.${Q}.lora_B.weight`))[3]).toBe(65504);
    await file.close();
  });

  it('refuses values that round past bf16\'s largest finite value', async () => {
    const adapter = new AdapterGenerator({ base: BASE_SHAPES.tiny, rank: 2, targets: ['q_proj'], layers: 1, seed: 5 }).adapter(0);
    const q = adapter.modules.get(Q)!;
    const b = Float32Array.from(q.b);
    b[0] = 3.4e38;
    await expect(saveLoraAdapter(freshDir(), { ...adapter, modules: new Map([[Q, { ...q, b }]]) }, { dtype: 'bf16' }))
      .rejects.toMatchObject({ code: 'ADAPTER_TENSORS', message: expect.stringMatching(/lora_B\.weight": value 3\.\d+e\+38 at element 0 is beyond the bf16 range/) });
  });
});
