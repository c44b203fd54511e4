/**
 * Export a PEFT LoRA adapter to a llama.cpp GGUF LoRA adapter (general.type = adapter,
 * adapter.type = lora): tensors blk.N.<module>.weight.lora_a ([R, K] row-major) and .lora_b
 * ([N, R]), f32. B rows of q/k are permuted like the base q/k weights (GGML rope layout).
 *
 * Scale: llama.cpp applies alpha / R per tensor. When every module's scale · R is the same value it
 * is written as adapter.lora.alpha and B stays as stored; otherwise (rank or alpha patterns, rsLoRA
 * with mixed ranks) the scale is folded into B and alpha is written as 0, which llama.cpp reads as
 * "scale 1".
 */
import { join } from 'node:path';
import { SoppuError } from '../../errors/soppu-error.js';
import type { LlamaConfig } from '../../model/llama-config.js';
import { loadLlamaConfig } from '../../model/llama-config.js';
import { loadLoraAdapter } from '../load-lora-adapter.js';
import type { LoraAdapter } from '../lora-types.js';
import { checkGgufExportable, GGUF_MODULE_NAMES } from './export-gguf-model.js';
import type { GgufTensor, GgufValue } from './gguf-writer.js';
import { writeGguf } from './gguf-writer.js';
import { permuteRopeRows } from './permute-rope-rows.js';

export interface ExportGgufLoraOptions {
  /** The base model directory (config.json gives the heads for the q/k permutation). */
  readonly modelDir: string;
  /** PEFT adapter directory. */
  readonly adapterDir: string;
  readonly out: string;
  readonly name?: string;
}

/** GGUF metadata and tensors of an adapter for a base model `config`. */
export function ggufLoraContent(adapter: LoraAdapter, config: LlamaConfig, name: string): { metadata: Map<string, GgufValue>; tensors: GgufTensor[] } {
  const where = adapter.source || name;
  if (adapter.passthrough.length > 0) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${where}: tensor "${adapter.passthrough[0]!.name}" (modules_to_save or bias) cannot be expressed in a GGUF LoRA adapter`, { file: where, tensor: adapter.passthrough[0]!.name });
  }
  const modules = [...adapter.modules.values()];
  if (modules.length === 0) throw new SoppuError('ADAPTER_TENSORS', `${where}: the adapter has no LoRA modules`, { file: where });
  const effectiveAlpha = modules[0]!.scale * modules[0]!.rank;
  // llama.cpp reads alpha 0 as "no scaling": a zero scale (PEFT's lora_alpha 0) is folded into B instead
  const uniform = effectiveAlpha !== 0 && modules.every((m) => Math.abs(m.scale * m.rank - effectiveAlpha) <= 1e-6 * Math.abs(effectiveAlpha));
  const tensors: GgufTensor[] = [];
  for (const m of modules) {
    const match = /^model\.layers\.(\d+)\.(.+)$/.exec(m.path);
    const stem = match ? GGUF_MODULE_NAMES[match[2]!] : undefined;
    if (!match || !stem || stem.endsWith('_norm') || m.layer < 0 || m.layer >= config.numLayers) {
      throw new SoppuError('ADAPTER_UNSUPPORTED', `${where}: module "${m.path}" has no GGUF counterpart in a ${config.numLayers}-layer llama model (supported: q/k/v/o_proj, gate/up/down_proj)`, { file: where, tensor: m.path });
    }
    const { hiddenSize: dModel, intermediateSize: dFfn, numHeads, numKvHeads, headDim } = config;
    const expected: Readonly<Record<string, readonly [number, number]>> = {
      attn_q: [dModel, numHeads * headDim], attn_k: [dModel, numKvHeads * headDim], attn_v: [dModel, numKvHeads * headDim], attn_output: [numHeads * headDim, dModel],
      ffn_gate: [dModel, dFfn], ffn_up: [dModel, dFfn], ffn_down: [dFfn, dModel],
    };
    const [inFeatures, outFeatures] = expected[stem]!;
    if (m.inFeatures !== inFeatures || m.outFeatures !== outFeatures) {
      throw new SoppuError('ADAPTER_INCOMPATIBLE', `${where}: module "${m.path}" is ${m.outFeatures}×${m.inFeatures} but the base model's is ${outFeatures}×${inFeatures}`, { file: where, tensor: m.path });
    }
    let b = m.b;
    if (!uniform) {
      b = new Float32Array(b);
      for (let i = 0; i < b.length; i++) b[i] = b[i]! * m.scale;
    }
    if (stem === 'attn_q') b = permuteRopeRows(b, m.outFeatures, m.rank, config.numHeads, `${m.path}.lora_B`);
    if (stem === 'attn_k') b = permuteRopeRows(b, m.outFeatures, m.rank, config.numKvHeads, `${m.path}.lora_B`);
    const base = `blk.${m.layer}.${stem}.weight`;
    tensors.push({ name: `${base}.lora_a`, type: 'F32', shape: [m.rank, m.inFeatures], data: m.a });
    tensors.push({ name: `${base}.lora_b`, type: 'F32', shape: [m.outFeatures, m.rank], data: b });
  }
  const metadata = new Map<string, GgufValue>();
  metadata.set('general.architecture', { type: 'string', value: 'llama' });
  metadata.set('general.type', { type: 'string', value: 'adapter' });
  metadata.set('general.name', { type: 'string', value: name });
  metadata.set('general.alignment', { type: 'uint32', value: 32 });
  metadata.set('adapter.type', { type: 'string', value: 'lora' });
  metadata.set('adapter.lora.alpha', { type: 'float32', value: uniform ? effectiveAlpha : 0 });
  return { metadata, tensors };
}

/** Load a PEFT adapter and write it as a GGUF LoRA adapter. Returns the file size in bytes. */
export async function exportGgufLora(options: ExportGgufLoraOptions): Promise<{ path: string; bytes: number; tensors: number }> {
  const config = await loadLlamaConfig(options.modelDir);
  checkGgufExportable(config, join(options.modelDir, 'config.json'));
  const adapter = await loadLoraAdapter(options.adapterDir);
  const name = options.name ?? (options.adapterDir.replace(/[\\/]+$/, '').split(/[\\/]/).pop() || 'adapter');
  const { metadata, tensors } = ggufLoraContent(adapter, config, name);
  const bytes = await writeGguf(options.out, metadata, tensors);
  return { path: options.out, bytes, tensors: tensors.length };
}
