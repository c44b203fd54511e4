import { describe, expect, it } from 'vitest';
import { ropeInvFreq } from '../../src/kernels/ref/rope-inv-freq.js';
import { parseLlamaConfig } from '../../src/model/llama-config.js';

const LLAMA = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
  num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 512, rms_norm_eps: 1e-5, rope_theta: 500000,
  max_position_embeddings: 4096, bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', tie_word_embeddings: false,
};

describe('parseLlamaConfig', () => {
  it('reads a Llama config with GQA and derived head_dim', () => {
    const config = parseLlamaConfig(LLAMA);
    expect(config).toMatchObject({
      architecture: 'llama', hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16,
      vocabSize: 512, rmsNormEps: 1e-5, ropeTheta: 500000, ropeScaling: null, maxPositionEmbeddings: 4096,
      tieWordEmbeddings: false, qkvBias: false, oBias: false, mlpBias: false, bosTokenId: 1, eosTokenIds: [2],
    });
  });

  it('reads an explicit head_dim, eos lists and attention_bias', () => {
    const config = parseLlamaConfig({ ...LLAMA, head_dim: 32, eos_token_id: [2, 7], attention_bias: true });
    expect(config.headDim).toBe(32);
    expect(config.eosTokenIds).toEqual([2, 7]);
    expect(config.qkvBias && config.oBias).toBe(true);
  });

  it('reads Llama-3 rope scaling and folds it into the inverse frequencies', () => {
    const scaling = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 };
    const config = parseLlamaConfig({ ...LLAMA, head_dim: 64, rope_scaling: scaling });
    expect(config.ropeScaling).toEqual({ ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    const plain = ropeInvFreq(64, 500000, null);
    const scaled = ropeInvFreq(64, 500000, config.ropeScaling);
    expect(scaled[0]).toBeCloseTo(plain[0]!, 7); // short wavelengths kept
    expect(scaled[31]! / plain[31]!).toBeCloseTo(1 / 8, 6); // long wavelengths divided by the factor
    expect(parseLlamaConfig({ ...LLAMA, rope_scaling: { type: 'default' } }).ropeScaling).toBeNull();
  });

  it('reads rope_theta and the scaling from rope_parameters (transformers v5 configs)', () => {
    const { rope_theta: _, ...noTheta } = LLAMA as Record<string, unknown>;
    expect(parseLlamaConfig({ ...noTheta, rope_parameters: { rope_type: 'default', rope_theta: 1e6 } })).toMatchObject({ ropeTheta: 1e6, ropeScaling: null });
    const llama3 = { rope_type: 'llama3', rope_theta: 500000, factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 };
    expect(parseLlamaConfig({ ...noTheta, rope_theta: null, rope_parameters: llama3 })).toMatchObject({
      ropeTheta: 500000,
      ropeScaling: { ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
    });
    expect(() => parseLlamaConfig({ ...noTheta, rope_parameters: { rope_type: 'yarn', factor: 4 } })).toThrow(/field "rope_parameters\.rope_type" names unsupported rope scaling "yarn"/);
    // v5 may give rope_parameters with the theta alone: plain rope
    expect(parseLlamaConfig({ ...noTheta, rope_parameters: { rope_theta: 1e6 } })).toMatchObject({ ropeTheta: 1e6, ropeScaling: null });
  });

  it('architectures null (transformers\' default) falls back to model_type', () => {
    expect(parseLlamaConfig({ ...LLAMA, architectures: null, model_type: 'qwen2' })).toMatchObject({ architecture: 'qwen2' });
  });

  it('reads linear rope scaling (position interpolation): every frequency divided by the factor', () => {
    const config = parseLlamaConfig({ ...LLAMA, head_dim: 64, rope_scaling: { type: 'linear', factor: 4 } });
    expect(config.ropeScaling).toEqual({ ropeType: 'linear', factor: 4 });
    const plain = ropeInvFreq(64, 10000, null);
    const scaled = ropeInvFreq(64, 10000, config.ropeScaling);
    for (let i = 0; i < 32; i++) expect(scaled[i]! * 4).toBeCloseTo(plain[i]!, 7);
    expect(() => parseLlamaConfig({ ...LLAMA, rope_scaling: { type: 'linear' } })).toThrow(/rope_scaling\.factor/);
  });

  it('refuses other rope scaling types by name', () => {
    expect(() => parseLlamaConfig({ ...LLAMA, rope_scaling: { type: 'yarn', factor: 4 } })).toThrow(expect.objectContaining({ code: 'MODEL_CONFIG', message: expect.stringMatching(/rope_scaling.rope_type.*"yarn".*supported: llama3, linear, default/) }));
    expect(() => parseLlamaConfig({ ...LLAMA, rope_scaling: { type: 'dynamic', factor: 2 } })).toThrow(/"dynamic"/);
    expect(() => parseLlamaConfig({ ...LLAMA, rope_scaling: { rope_type: 'llama3' } })).toThrow(/rope_scaling.factor/);
  });

  it('requires every llama3 rope scaling key, as transformers does, naming it', () => {
    const full = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 };
    for (const key of ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']) {
      const { [key]: _, ...missing } = full as Record<string, unknown>;
      expect(() => parseLlamaConfig({ ...LLAMA, rope_scaling: missing })).toThrow(new RegExp(`field "rope_scaling\\.${key}" is required for rope_type "llama3"`));
      expect(() => parseLlamaConfig({ ...LLAMA, rope_parameters: { ...missing, rope_theta: 5e5 } })).toThrow(new RegExp(`field "rope_parameters\\.${key}" is required`));
    }
  });

  it('reads bias flags for Llama only: Mistral has no biases and Qwen2 q/k/v biases alone, whatever the flags say', () => {
    const flags = { attention_bias: true, mlp_bias: true };
    expect(parseLlamaConfig({ ...LLAMA, ...flags })).toMatchObject({ qkvBias: true, oBias: true, mlpBias: true });
    expect(parseLlamaConfig({ ...LLAMA, ...flags, architectures: ['MistralForCausalLM'], model_type: 'mistral' })).toMatchObject({ qkvBias: false, oBias: false, mlpBias: false });
    expect(parseLlamaConfig({ ...LLAMA, ...flags, architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2' })).toMatchObject({ qkvBias: true, oBias: false, mlpBias: false });
  });

  it('reads Qwen2 (q/k/v biases, tied embeddings)', () => {
    const config = parseLlamaConfig({ ...LLAMA, architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', tie_word_embeddings: true, use_sliding_window: false, sliding_window: 32 });
    expect(config).toMatchObject({ architecture: 'qwen2', qkvBias: true, oBias: false, tieWordEmbeddings: true, maxPositionEmbeddings: 4096 });
  });

  it('caps a Mistral context at its sliding window', () => {
    expect(parseLlamaConfig({ ...LLAMA, architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: 1024 }).maxPositionEmbeddings).toBe(1024);
    expect(parseLlamaConfig({ ...LLAMA, architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: null }).maxPositionEmbeddings).toBe(4096);
    // no key at all: MistralConfig's default window, 4096
    expect(parseLlamaConfig({ ...LLAMA, architectures: ['MistralForCausalLM'], model_type: 'mistral', max_position_embeddings: 32768 }).maxPositionEmbeddings).toBe(4096);
  });

  it('falls back to model_type and refuses unsupported architectures naming the field', () => {
    const { architectures: _, ...noArchitectures } = LLAMA;
    expect(parseLlamaConfig(noArchitectures).architecture).toBe('llama');
    expect(() => parseLlamaConfig({ ...LLAMA, architectures: ['GPT2LMHeadModel'] })).toThrow(expect.objectContaining({ code: 'MODEL_CONFIG', context: expect.objectContaining({ field: 'architectures' }) }));
    expect(() => parseLlamaConfig({ ...noArchitectures, model_type: 'gpt2' })).toThrow(/field "model_type".*"gpt2"/);
  });

  it('refuses bad fields naming them and the limit', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ hidden_size: undefined }, /"hidden_size" is required/],
      [{ num_hidden_layers: 0 }, /"num_hidden_layers" must be a positive integer/],
      [{ num_key_value_heads: 3 }, /"num_key_value_heads" \(3\) must divide num_attention_heads \(4\)/],
      [{ hidden_act: 'gelu' }, /"hidden_act" must be "silu"/],
      [{ eos_token_id: 512 }, /"eos_token_id" must be a token id in \[0, 512\)/],
      [{ rms_norm_eps: -1 }, /"rms_norm_eps" must be a positive number/],
      [{ tie_word_embeddings: 'yes' }, /"tie_word_embeddings" must be a boolean/],
    ];
    for (const [patch, message] of cases) expect(() => parseLlamaConfig({ ...LLAMA, ...patch }, 'm/config.json')).toThrow(message);
    expect(() => parseLlamaConfig([], 'm/config.json')).toThrow(/m\/config.json must be a JSON object/);
  });
});
