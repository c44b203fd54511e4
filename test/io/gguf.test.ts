import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import { exportGgufLora } from '../../src/io/gguf/export-gguf-lora.js';
import { exportGgufModel } from '../../src/io/gguf/export-gguf-model.js';
import { serializeGguf, type GgufValue } from '../../src/io/gguf/gguf-writer.js';
import { permuteRopeRows } from '../../src/io/gguf/permute-rope-rows.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import { openSafetensors, writeSafetensors } from '../../src/io/safetensors.js';
import { bf16ArrayToF32 } from '../../src/tensor/dtype.js';

/** A small independent GGUF v3 reader (the spec, read back). */
interface ParsedGguf {
  version: number;
  metadata: Map<string, { type: number; value: unknown }>;
  tensors: { name: string; dims: number[]; type: number; offset: number }[];
  dataStart: number;
  bytes: Uint8Array;
}

function parseGguf(bytes: Uint8Array): ParsedGguf {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const decoder = new TextDecoder('utf-8', { fatal: true });
  let at = 0;
  const u32 = (): number => {
    const v = view.getUint32(at, true);
    at += 4;
    return v;
  };
  const u64 = (): number => {
    const v = Number(view.getBigUint64(at, true));
    at += 8;
    return v;
  };
  const str = (): string => {
    const length = u64();
    const s = decoder.decode(bytes.subarray(at, at + length));
    at += length;
    return s;
  };
  const scalar = (type: number): unknown => {
    switch (type) {
      case 0: return view.getUint8(at++);
      case 1: return view.getInt8(at++);
      case 4: return u32();
      case 5: { const v = view.getInt32(at, true); at += 4; return v; }
      case 6: { const v = view.getFloat32(at, true); at += 4; return v; }
      case 7: return view.getUint8(at++) !== 0;
      case 8: return str();
      case 10: return u64();
      case 12: { const v = view.getFloat64(at, true); at += 8; return v; }
      default: throw new Error(`reader: value type ${type} not handled`);
    }
  };
  expect(u32()).toBe(0x46554747);
  expect(new TextDecoder().decode(bytes.subarray(0, 4))).toBe('GGUF');
  const version = u32();
  const tensorCount = u64();
  const kvCount = u64();
  const metadata = new Map<string, { type: number; value: unknown }>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = u32();
    if (type === 9) {
      const elementType = u32();
      const n = u64();
      const values: unknown[] = [];
      for (let j = 0; j < n; j++) values.push(scalar(elementType));
      metadata.set(key, { type: elementType + 100, value: values });
    } else metadata.set(key, { type, value: scalar(type) });
  }
  const tensors: ParsedGguf['tensors'] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const nDims = u32();
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(u64());
    tensors.push({ name, dims, type: u32(), offset: u64() });
  }
  const alignment = (metadata.get('general.alignment')?.value as number | undefined) ?? 32;
  const dataStart = Math.ceil(at / alignment) * alignment;
  return { version, metadata, tensors, dataStart, bytes };
}

function tensorF32(file: ParsedGguf, name: string): Float32Array {
  const info = file.tensors.find((t) => t.name === name);
  if (!info) throw new Error(`no tensor ${name}`);
  const count = info.dims.reduce((a, b) => a * b, 1);
  const start = file.dataStart + info.offset;
  const copy = file.bytes.slice(start, start + count * (info.type === 0 ? 4 : 2));
  return info.type === 0 ? new Float32Array(copy.buffer) : bf16ArrayToF32(new Uint16Array(copy.buffer));
}

function meta(file: ParsedGguf, key: string): unknown {
  return file.metadata.get(key)?.value;
}

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soppu-gguf-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('GGUF writer', () => {
  it('lays out header, typed metadata, GGML-order dims and 32-byte aligned data', () => {
    const metadata = new Map<string, GgufValue>([
      ['a.u32', { type: 'uint32', value: 7 }],
      ['a.f32', { type: 'float32', value: 0.5 }],
      ['a.bool', { type: 'bool', value: true }],
      ['a.str', { type: 'string', value: 'héllo' }],
      ['a.arr', { type: 'array', elementType: 'int32', value: [1, -2, 3] }],
    ]);
    const x = Float32Array.from({ length: 6 }, (_, i) => i + 0.25);
    const y = new Uint16Array([1, 2, 3]);
    const serialized = serializeGguf(metadata, [
      { name: 'x', type: 'F32', shape: [2, 3], data: x },
      { name: 'y', type: 'F16', shape: [3], data: y },
    ]);
    const bytes = new Uint8Array(serialized.byteLength);
    let at = 0;
    for (const chunk of serialized.chunks) {
      bytes.set(chunk, at);
      at += chunk.length;
    }
    const file = parseGguf(bytes);
    expect(file.version).toBe(3);
    expect(meta(file, 'a.u32')).toBe(7);
    expect(meta(file, 'a.f32')).toBe(0.5);
    expect(meta(file, 'a.bool')).toBe(true);
    expect(meta(file, 'a.str')).toBe('héllo');
    expect(meta(file, 'a.arr')).toEqual([1, -2, 3]);
    expect(meta(file, 'general.alignment')).toBe(32);
    expect(file.tensors).toEqual([
      { name: 'x', dims: [3, 2], type: 0, offset: 0 },
      { name: 'y', dims: [3], type: 1, offset: 32 },
    ]);
    expect(file.dataStart % 32).toBe(0);
    expect(bytes.length).toBe(file.dataStart + 64);
    expect(tensorF32(file, 'x')).toEqual(x);
  });

  it('refuses data that does not match the shape', () => {
    expect(() => serializeGguf(new Map(), [{ name: 'x', type: 'F32', shape: [2, 3], data: new Float32Array(5) }])).toThrow(/does not match shape/);
    expect(() => serializeGguf(new Map(), [{ name: 'x', type: 'BF16', shape: [2], data: new Float32Array(2) }])).toThrow(/does not match shape/);
  });
});

describe('rope row permutation', () => {
  it('interleaves the two halves of each head (convert_hf_to_gguf permute)', () => {
    // 2 heads of D = 4, one column: rows h0:[0,1,2,3] h1:[4,5,6,7] → [0,2,1,3, 4,6,5,7]
    const rows = Float32Array.from([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(Array.from(permuteRopeRows(rows, 8, 1, 2))).toEqual([0, 2, 1, 3, 4, 6, 5, 7]);
    // whole rows move
    const wide = Float32Array.from({ length: 8 }, (_, i) => i);
    expect(Array.from(permuteRopeRows(wide, 4, 2, 1))).toEqual([0, 1, 4, 5, 2, 3, 6, 7]);
    expect(() => permuteRopeRows(new Float32Array(6), 6, 1, 2)).toThrow(/heads of even size/);
  });
});

describe('exportGgufModel', () => {
  it('writes llama metadata, the gpt2 vocabulary and every weight of a tiny bf16 model', async () => {
    const modelDir = join(dir, 'tiny-bf16');
    await generateModel({ out: modelDir, shape: 'tiny', dtype: 'bf16', seed: 4 });
    const out = join(dir, 'tiny.gguf');
    const result = await exportGgufModel({ modelDir, out });
    expect(result.type).toBe('bf16');
    const file = parseGguf(new Uint8Array(await readFile(out)));
    expect(result.bytes).toBe(file.bytes.length);
    expect(meta(file, 'general.architecture')).toBe('llama');
    expect(meta(file, 'llama.embedding_length')).toBe(64);
    expect(meta(file, 'llama.block_count')).toBe(2);
    expect(meta(file, 'llama.feed_forward_length')).toBe(128);
    expect(meta(file, 'llama.attention.head_count')).toBe(4);
    expect(meta(file, 'llama.attention.head_count_kv')).toBe(2);
    expect(meta(file, 'llama.rope.dimension_count')).toBe(16);
    expect(meta(file, 'llama.context_length')).toBe(2048);
    expect(meta(file, 'llama.rope.freq_base')).toBe(10000);
    expect(meta(file, 'llama.attention.layer_norm_rms_epsilon')).toBeCloseTo(1e-5, 10);
    expect(meta(file, 'tokenizer.ggml.model')).toBe('gpt2');
    const tokens = meta(file, 'tokenizer.ggml.tokens') as string[];
    const types = meta(file, 'tokenizer.ggml.token_type') as number[];
    expect(tokens).toHaveLength(512);
    expect(tokens[511]).toBe('<|end|>');
    expect(types[511]).toBe(3);
    expect(types[300]).toBe(1);
    expect((meta(file, 'tokenizer.ggml.merges') as string[]).length).toBe(512 - 256 - 6);
    expect(meta(file, 'tokenizer.ggml.bos_token_id')).toBe(tokens.indexOf('<|begin_of_text|>'));
    expect(meta(file, 'tokenizer.ggml.eos_token_id')).toBe(tokens.indexOf('<|end_of_text|>'));
    expect(meta(file, 'tokenizer.ggml.add_bos_token')).toBe(true);

    // 1 embedding + 9 per layer + final norm + untied output
    expect(file.tensors.map((t) => t.name)).toHaveLength(1 + 2 * 9 + 2);
    const byName = new Map(file.tensors.map((t) => [t.name, t]));
    expect(byName.get('token_embd.weight')).toMatchObject({ dims: [64, 512], type: 30 });
    expect(byName.get('blk.1.attn_k.weight')).toMatchObject({ dims: [64, 32], type: 30 });
    expect(byName.get('blk.0.ffn_down.weight')).toMatchObject({ dims: [128, 64], type: 30 });
    expect(byName.get('blk.0.attn_norm.weight')).toMatchObject({ dims: [64], type: 0 });
    expect(byName.has('output.weight')).toBe(true);
    for (const t of file.tensors) expect(t.offset % 32).toBe(0);
    expect(file.dataStart % 32).toBe(0);

    const weights = await openSafetensors(join(modelDir, 'model.safetensors'));
    try {
      const v = await weights.readF32('model.layers.1.self_attn.v_proj.weight');
      expect(tensorF32(file, 'blk.1.attn_v.weight')).toEqual(v);
      expect(tensorF32(file, 'output_norm.weight')).toEqual(await weights.readF32('model.norm.weight'));
      // q rows permuted per head (H = 4, D = 16): GGUF row h·16 + 2j + t = HF row h·16 + 8t + j
      const q = await weights.readF32('model.layers.0.self_attn.q_proj.weight');
      const gq = tensorF32(file, 'blk.0.attn_q.weight');
      for (const [h, j, t] of [[0, 0, 1], [2, 5, 0], [3, 7, 1]] as const) {
        const ggufRow = h * 16 + 2 * j + t;
        const hfRow = h * 16 + 8 * t + j;
        expect(gq.subarray(ggufRow * 64, ggufRow * 64 + 64)).toEqual(q.subarray(hfRow * 64, hfRow * 64 + 64));
      }
      expect(gq).not.toEqual(q);
    } finally {
      await weights.close();
    }
  });

  it('converts to f32 on request and leaves out output.weight when tied', async () => {
    const modelDir = join(dir, 'tiny-tied');
    await generateModel({ out: modelDir, shape: 'tiny', dtype: 'bf16', seed: 4, tied: true });
    const out = join(dir, 'tied.gguf');
    await exportGgufModel({ modelDir, out, type: 'f32' });
    const file = parseGguf(new Uint8Array(await readFile(out)));
    expect(file.tensors.some((t) => t.name === 'output.weight')).toBe(false);
    expect(file.tensors.find((t) => t.name === 'token_embd.weight')?.type).toBe(0);
    expect(meta(file, 'general.file_type')).toBe(0);
  });

  it('refuses a weight outside the narrow type\'s range (it was written as Infinity), naming the tensor and element', async () => {
    const modelDir = join(dir, 'tiny-f32-large');
    await generateModel({ out: modelDir, shape: 'tiny', dtype: 'f32', seed: 4 });
    const file = join(modelDir, 'model.safetensors');
    const weights = await openSafetensors(file);
    const tensors = await Promise.all(weights.tensors.map(async (t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: await weights.readF32(t.name) })));
    await weights.close();
    const down = tensors.find((t) => t.name === 'model.layers.0.mlp.down_proj.weight')!;
    down.data[5] = 70000;
    await writeSafetensors(file, tensors);
    await expect(exportGgufModel({ modelDir, out: join(dir, 'large-f16.gguf'), type: 'f16' })).rejects.toMatchObject({
      code: 'MODEL_WEIGHTS',
      message: `${file}: tensor "model.layers.0.mlp.down_proj.weight" element 5 is 70000, outside f16's range: export with --type bf16 or f32`,
    });
    await exportGgufModel({ modelDir, out: join(dir, 'large-bf16.gguf'), type: 'bf16' });
  });

  it('names the field it cannot export', async () => {
    const modelDir = join(dir, 'tiny-qwen');
    await generateModel({ out: modelDir, shape: 'tiny', arch: 'qwen2', seed: 4 });
    const error = await exportGgufModel({ modelDir, out: join(dir, 'qwen.gguf') }).catch((e: unknown) => e);
    expect(isSoppuError(error, 'MODEL_CONFIG')).toBe(true);
    expect((error as Error).message).toMatch(/config\.json: field "architectures"/);
  });
});

describe('GGUF tokenizer metadata', () => {
  /** A copy of the tiny model whose tokenizer files `edit` changes. */
  async function edited(name: string, edit: (tokenizer: Record<string, any>, config: Record<string, any>) => void): Promise<string> {
    const modelDir = join(dir, name);
    await generateModel({ out: modelDir, shape: 'tiny', seed: 4 });
    const tokenizer = JSON.parse(await readFile(join(modelDir, 'tokenizer.json'), 'utf8'));
    const config = JSON.parse(await readFile(join(modelDir, 'tokenizer_config.json'), 'utf8'));
    edit(tokenizer, config);
    await writeFile(join(modelDir, 'tokenizer.json'), JSON.stringify(tokenizer));
    await writeFile(join(modelDir, 'tokenizer_config.json'), JSON.stringify(config));
    return modelDir;
  }
  const exported = async (modelDir: string) => {
    const out = join(modelDir, 'model.gguf');
    await exportGgufModel({ modelDir, out });
    return parseGguf(new Uint8Array(await readFile(out)));
  };

  it('names the pre-tokenizer as llama.cpp does, and refuses a tokenizer llama.cpp would split differently', async () => {
    expect(meta(await exported(await edited('tok-gpt2', () => undefined)), 'tokenizer.ggml.pre')).toBe('gpt-2');
    const smollm = await edited('tok-smollm', (t) => {
      t.pre_tokenizer = { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: true }, t.pre_tokenizer] };
    });
    expect(meta(await exported(smollm), 'tokenizer.ggml.pre')).toBe('smollm');
    const sentencePiece = await edited('tok-spm', (t) => {
      t.model.byte_fallback = true;
    });
    await expect(exportGgufModel({ modelDir: sentencePiece, out: join(sentencePiece, 'x.gguf') })).rejects.toThrow(/byte_fallback.*byte-level BPE tokenizers only/);
    const otherSplit = await edited('tok-split', (t) => {
      t.pre_tokenizer = { type: 'Sequence', pretokenizers: [{ type: 'Split', pattern: { Regex: '\\s+' }, behavior: 'Isolated' }, { ...t.pre_tokenizer, use_regex: false }] };
    });
    await expect(exportGgufModel({ modelDir: otherSplit, out: join(otherSplit, 'x.gguf') })).rejects.toThrow(/pre-tokenizer \(Split \+ ByteLevel\)/);
    // llama.cpp's gpt-2 path applies no normalizer and adds no prefix space
    const lowercased = await edited('tok-lower', (t) => {
      t.normalizer = { type: 'Lowercase' };
    });
    await expect(exportGgufModel({ modelDir: lowercased, out: join(lowercased, 'x.gguf') })).rejects.toThrow(/has a normalizer \("Lowercase"\)/);
    const prefixed = await edited('tok-prefix', (t) => {
      t.pre_tokenizer = { ...t.pre_tokenizer, add_prefix_space: true };
    });
    await expect(exportGgufModel({ modelDir: prefixed, out: join(prefixed, 'x.gguf') })).rejects.toThrow(/adds a prefix space/);
  });

  it('adds BOS as the tokenizer does when the config does not say, and exports chat_template.jinja', async () => {
    // no add_bos_token in the config (as Llama 3 ships): the post-processor's template decides
    const noFlag = await edited('tok-bos', (_t, c) => {
      delete c.add_bos_token;
    });
    await writeFile(join(noFlag, 'chat_template.jinja'), '{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}');
    const file = await exported(noFlag);
    expect(meta(file, 'tokenizer.ggml.add_bos_token')).toBe(true);
    expect(meta(file, 'tokenizer.chat_template')).toBe('{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}');
  });

  it('reads the tokenizer files as the tokenizer does: one there but unreadable is FILE_IO, not "not found"', async () => {
    const modelDir = await edited('tok-unreadable', () => undefined);
    await rm(join(modelDir, 'tokenizer_config.json'));
    await mkdir(join(modelDir, 'tokenizer_config.json')); // a folder stands in for an unreadable file
    await expect(exportGgufModel({ modelDir, out: join(modelDir, 'x.gguf') }))
      .rejects.toMatchObject({ code: 'FILE_IO', message: expect.stringContaining(`tokenizer file ${join(modelDir, 'tokenizer_config.json')} could not be read`) });
  });
});

describe('exportGgufLora', () => {
  it('writes lora_a/lora_b with alpha, q/k B rows permuted', async () => {
    const modelDir = join(dir, 'tiny-lora-base');
    await generateModel({ out: modelDir, shape: 'tiny', dtype: 'f32', seed: 4 });
    const [adapterDir] = await writeGeneratedAdapters(join(dir, 'adapters'), 1, { base: BASE_SHAPES.tiny, rank: 4, targets: ['q_proj', 'k_proj', 'down_proj'], seed: 2, alpha: 16 });
    const out = join(dir, 'lora.gguf');
    await exportGgufLora({ modelDir, adapterDir: adapterDir!, out });
    const file = parseGguf(new Uint8Array(await readFile(out)));
    expect(meta(file, 'general.type')).toBe('adapter');
    expect(meta(file, 'adapter.type')).toBe('lora');
    expect(meta(file, 'general.architecture')).toBe('llama');
    expect(meta(file, 'adapter.lora.alpha')).toBe(16);
    expect(file.tensors).toHaveLength(2 * 2 * 3);
    const byName = new Map(file.tensors.map((t) => [t.name, t]));
    expect(byName.get('blk.0.attn_q.weight.lora_a')).toMatchObject({ dims: [64, 4], type: 0 });
    expect(byName.get('blk.0.attn_q.weight.lora_b')).toMatchObject({ dims: [4, 64], type: 0 });
    expect(byName.get('blk.1.ffn_down.weight.lora_a')).toMatchObject({ dims: [128, 4] });
    const adapter = await loadLoraAdapter(adapterDir!);
    const k = adapter.modules.get('model.layers.1.self_attn.k_proj')!;
    expect(tensorF32(file, 'blk.1.attn_k.weight.lora_a')).toEqual(k.a);
    expect(tensorF32(file, 'blk.1.attn_k.weight.lora_b')).toEqual(permuteRopeRows(k.b, 32, 4, 2));
    const down = adapter.modules.get('model.layers.0.mlp.down_proj')!;
    expect(tensorF32(file, 'blk.0.ffn_down.weight.lora_b')).toEqual(down.b);
    // lora_alpha 0 silences the adapter in PEFT; llama.cpp reads alpha 0 as "no scaling", so the zero goes into B
    const config = JSON.parse(await readFile(join(adapterDir!, 'adapter_config.json'), 'utf8'));
    await writeFile(join(adapterDir!, 'adapter_config.json'), JSON.stringify({ ...config, lora_alpha: 0 }));
    const silent = join(dir, 'lora-alpha0.gguf');
    await exportGgufLora({ modelDir, adapterDir: adapterDir!, out: silent });
    const zero = parseGguf(new Uint8Array(await readFile(silent)));
    expect(meta(zero, 'adapter.lora.alpha')).toBe(0);
    for (const t of zero.tensors.filter((t) => t.name.endsWith('lora_b'))) expect(tensorF32(zero, t.name).every((v) => v === 0)).toBe(true);
  });
});

describe('exportGgufLora on a mismatched base', () => {
  it('names the module whose shape does not match', async () => {
    const modelDir = join(dir, 'tiny-lora-mismatch');
    await generateModel({ out: modelDir, shape: 'tiny', dtype: 'f32', seed: 4 });
    const [adapterDir] = await writeGeneratedAdapters(join(dir, 'adapters-wide'), 1, { base: { ...BASE_SHAPES.tiny, hiddenSize: 32 }, rank: 2, targets: ['v_proj'], seed: 2 });
    const error = await exportGgufLora({ modelDir, adapterDir: adapterDir!, out: join(dir, 'bad.gguf') }).catch((e: unknown) => e);
    expect(isSoppuError(error, 'ADAPTER_INCOMPATIBLE')).toBe(true);
    expect((error as Error).message).toMatch(/model\.layers\.0\.self_attn\.v_proj" is 32×32 but the base model's is 32×64/);
  });
});
