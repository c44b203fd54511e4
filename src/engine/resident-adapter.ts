/**
 * The in-memory form of an adapter the engine serves: per slot (layer, module), either raw LoRA
 * factors (A, (scale·B)ᵀ) or a compressed core that multiplies a cluster's shared bases (Vᵀ, Uᵀ).
 * Scale is folded in here, at load, so the kernels never see it; expand factors are transposed here
 * too ([R, N]), once, so the expand kernel streams contiguous output rows; and factors are stored in the
 * engine's adapter dtype (f32, or bf16/f16 for half the memory and memory traffic), compressed cores
 * included: a core is the one part of a compressed adapter that is each user's own.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraCore } from '../kernels/kernel-set.js';
import type { BankAdapterParts, SharedBases } from '../compress/bank-reader-types.js';
import { F32_MAX } from '../io/load-lora-adapter.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { TARGET_MODULES, type TargetModule } from '../model/adapter-hook.js';
import { F16_MAX, WEIGHT_DTYPE_BYTES, narrowFinite, type WeightDtype } from '../tensor/dtype.js';
import { alignedBytes, alignedViews } from '../tensor/aligned-views.js';
import { weightMatrix, type WeightMatrix } from '../tensor/weight-matrix.js';

/** A buffer several keys' bases share (residentBasesInOneBuffer): its size, and how many of its keys are held. */
export interface BasesGroup {
  readonly bytes: number;
  held: number;
}

/** A cluster's shared bases for one slot, as kernel operands. */
export interface ResidentBases {
  readonly key: string;
  readonly rank: number;
  /** Vᵀ: [R, K] — the shared shrink. */
  readonly a: WeightMatrix;
  /** Uᵀ: [R, N] — the shared expand. */
  readonly bt: WeightMatrix;
  readonly bytes: number;
  /** The buffer these bases share with others, when they do. */
  readonly group?: BasesGroup;
}

export type ResidentSlot =
  | { readonly kind: 'raw'; readonly rank: number; readonly a: WeightMatrix; readonly bt: WeightMatrix }
  | { readonly kind: 'compressed'; readonly rank: number; readonly bases: ResidentBases; readonly core: LoraCore };

export interface ResidentAdapter {
  readonly id: string;
  readonly source: 'bank' | 'local';
  /** 'compressed' when any slot is compressed. */
  readonly storage: 'compressed' | 'raw';
  /** Bank cluster, or -1 for adapters served raw from a PEFT directory. */
  readonly cluster: number;
  /** Keyed by slotKey(layer, module). */
  readonly slots: ReadonlyMap<string, ResidentSlot>;
  /** Bytes of this adapter's own parts (shared bases excluded: the cache counts those once). */
  readonly bytes: number;
  /** Keys of the shared bases this adapter multiplies. */
  readonly basesKeys: readonly string[];
}

/** In and out features of the base linear at (layer, module), or null when the model has none. */
export type SlotShape = (layer: number, module: TargetModule) => { inFeatures: number; outFeatures: number } | null;

export function slotKey(layer: number, module: string): string {
  return `${layer}.${module}`;
}

/** Parses a canonical module path ("model.layers.3.self_attn.q_proj") into layer and module. */
export function parseSlotPath(path: string): { layer: number; module: TargetModule } | null {
  // the decoder's own layers only (model.layers.N.self_attn|mlp.<module>): a vision tower's
  // "…encoder.layers.0.self_attn.q_proj" would otherwise take the text model's slot
  const match = /^(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)$/.exec(path);
  if (!match) return null;
  const module = match[2] as TargetModule;
  if (!TARGET_MODULES.includes(module)) return null;
  return { layer: Number(match[1]), module };
}

/** Puts a slot's factors in place; a second module for the same slot is an error, not a silent overwrite. */
function setOnce<T>(slots: Map<string, T>, key: string, value: T, id: string, file: string, path: string): void {
  if (slots.has(key)) throw new SoppuError('ADAPTER_INCOMPATIBLE', `adapter ${id}: module ${path} adapts a layer another of its modules already adapts (slot ${key})`, { file, tensor: path });
  slots.set(key, value);
}

function checkedSlot(id: string, file: string, path: string, shape: SlotShape, inFeatures: number, outFeatures: number): string {
  const parsed = parseSlotPath(path);
  const expected = parsed ? shape(parsed.layer, parsed.module) : null;
  if (!parsed || !expected) {
    throw new SoppuError('ADAPTER_INCOMPATIBLE', `adapter ${id}: module ${path} is not a linear layer of the base model this engine serves`, {
      file,
      tensor: path,
    });
  }
  if (expected.inFeatures !== inFeatures || expected.outFeatures !== outFeatures) {
    throw new SoppuError(
      'ADAPTER_INCOMPATIBLE',
      `adapter ${id}: module ${path} is [${outFeatures}, ${inFeatures}] (out, in) but the base model's is [${expected.outFeatures}, ${expected.inFeatures}]`,
      { file, tensor: path, limit: `[${expected.outFeatures}, ${expected.inFeatures}]` },
    );
  }
  return slotKey(parsed.layer, parsed.module);
}

function checkFinite(id: string, file: string, path: string, data: Float32Array): void {
  for (let i = 0; i < data.length; i++) {
    if (!Number.isFinite(data[i]!)) {
      throw new SoppuError('ADAPTER_TENSORS', `adapter ${id}: module ${path} holds a non-finite value at element ${i}`, { file, tensor: path });
    }
  }
}

/** scale · mᵀ as a new [cols, rows] array — m: [rows, cols] row-major. */
function transposed(m: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = m[r * cols + c]! * scale;
  return out;
}

/**
 * Refuses an adapter that carries non-LoRA tensors (modules_to_save heads, base-layer biases):
 * serving only its LoRA deltas would compute something other than PEFT or LoRAX do with it.
 */
function refusePassthrough(id: string, file: string, names: readonly string[]): void {
  const first = names[0];
  if (first === undefined) return;
  throw new SoppuError(
    'ADAPTER_UNSUPPORTED',
    `adapter ${id}: tensor "${first}"${names.length > 1 ? ` (and ${names.length - 1} more)` : ''} is not a LoRA factor (a modules_to_save module or a bias): ` +
      'SOPPU serves LoRA deltas only, and without it the output would differ from PEFT\'s (the adapter can still be compressed and exported)',
    { file, tensor: first },
  );
}

/**
 * An f32 factor [rows, cols] as a kernel operand of `dtype` (rounded to nearest even when 16-bit).
 * f16 cannot hold a magnitude above 65504: such a factor is refused (it would serve infinities).
 */
function factor(dtype: WeightDtype, rows: number, cols: number, data: Float32Array, tensor: string, file: string, place?: FactorPlacer): WeightMatrix {
  if (dtype === 'f32') {
    if (!place) return weightMatrix('f32', rows, cols, data);
    const placed = place(rows * cols) as Float32Array;
    placed.set(data);
    return weightMatrix('f32', rows, cols, placed);
  }
  const narrowed = narrowFinite(data, dtype, place?.(rows * cols) as Uint16Array | undefined);
  if ('bits' in narrowed) return weightMatrix(dtype, rows, cols, narrowed.bits);
  const i = narrowed.overflowAt;
  if (dtype === 'bf16') throw new SoppuError('ADAPTER_TENSORS', `${tensor}: value ${data[i]} at element ${i} is beyond the bf16 range; serve adapters as f32 (lora dtype)`, { file, tensor });
  throw new SoppuError('ADAPTER_TENSORS', `${tensor}: value ${data[i]} at element ${i} is beyond the f16 range (±${F16_MAX}); serve adapters as f32 or bf16 (lora dtype)`, {
    file,
    tensor,
    limit: F16_MAX,
  });
}

function bytesOf(matrix: WeightMatrix): number {
  return matrix.data.byteLength;
}

/**
 * A PEFT adapter served raw: A as is, B scaled (ΔW = (s·B)·A); factors stored as `dtype`. Refuses an
 * adapter with passthrough tensors (ADAPTER_UNSUPPORTED) and one whose s·B overflows f32 (ADAPTER_TENSORS).
 */
export function residentFromLora(id: string, adapter: LoraAdapter, shape: SlotShape, dtype: WeightDtype = 'f32'): ResidentAdapter {
  refusePassthrough(id, adapter.source, adapter.passthrough.map((p) => p.name));
  const slots = new Map<string, ResidentSlot>();
  let bytes = 0;
  for (const module of adapter.modules.values()) {
    const key = checkedSlot(id, adapter.source, module.path, shape, module.inFeatures, module.outFeatures);
    checkFinite(id, adapter.source, module.path, module.a);
    checkFinite(id, adapter.source, module.path, module.b);
    const scaled = transposed(module.b, module.outFeatures, module.rank, module.scale);
    for (let i = 0; i < scaled.length; i++) {
      if (!Number.isFinite(scaled[i]!)) {
        throw new SoppuError('ADAPTER_TENSORS', `adapter ${id}: module ${module.path}: scale ${module.scale} · lora_B is beyond the f32 range (±${F32_MAX}) at element ${i}`, {
          file: adapter.source, tensor: module.path, limit: F32_MAX,
        });
      }
    }
    const a = factor(dtype, module.rank, module.inFeatures, dtype === 'f32' ? new Float32Array(module.a) : module.a, `${module.path}.lora_A`, adapter.source);
    const bt = factor(dtype, module.rank, module.outFeatures, scaled, `${module.path}.lora_B`, adapter.source);
    setOnce(slots, key, { kind: 'raw', rank: module.rank, a, bt }, id, adapter.source, module.path);
    bytes += bytesOf(a) + bytesOf(bt);
  }
  return { id, source: 'local', storage: 'raw', cluster: -1, slots, bytes, basesKeys: [] };
}

/** Where a factor of `elements` values (of the dtype being built) is written: a view into a shared buffer. */
type FactorPlacer = (elements: number) => Float32Array | Uint16Array;

/** Shared bases as kernel operands of `dtype` (each factor a fresh array, or where `place` puts it). */
export function residentBases(bases: SharedBases, dtype: WeightDtype = 'f32', file = '', place?: FactorPlacer): ResidentBases {
  const a = factor(dtype, bases.rank, bases.inFeatures, bases.vt, `${bases.path}.Vt`, file, place);
  const bt = factor(dtype, bases.rank, bases.outFeatures, transposed(bases.u, bases.outFeatures, bases.rank), `${bases.path}.U`, file, place);
  return { key: bases.key, rank: bases.rank, a, bt, bytes: bytesOf(a) + bytesOf(bt) };
}

/**
 * Several shared bases as kernel operands of `dtype`, every factor written into one buffer from `allocate`, each
 * at a 64-byte boundary: a cluster's bases then share one mapping (huge pages, when the allocator gives them, so a
 * step's short reads of many factors walk fewer page tables). The buffer lives while any of the returned bases does.
 */
export function residentBasesInOneBuffer(list: readonly SharedBases[], dtype: WeightDtype, file: string, allocate: (bytes: number) => ArrayBuffer): ResidentBases[] {
  const padded = (elements: number): number => alignedBytes(elements * WEIGHT_DTYPE_BYTES[dtype]);
  const buffer = allocate(list.reduce((sum, bases) => sum + padded(bases.rank * bases.inFeatures) + padded(bases.rank * bases.outFeatures), 0));
  const views = alignedViews(buffer);
  const place: FactorPlacer = (elements) => views(dtype, elements);
  const group: BasesGroup = { bytes: buffer.byteLength, held: 0 };
  return list.map((bases) => ({ ...residentBases(bases, dtype, file, place), group }));
}

/**
 * A bank adapter: compressed slots reference the already loaded shared bases in `bases`; raw factors
 * and cores stored as `dtype`. Refuses (ADAPTER_UNSUPPORTED) an adapter with passthrough tensors.
 */
export function residentFromBank(
  parts: BankAdapterParts,
  bases: ReadonlyMap<string, ResidentBases>,
  shape: SlotShape,
  file: string,
  dtype: WeightDtype = 'f32',
): ResidentAdapter {
  refusePassthrough(parts.id, file, parts.passthrough ?? []);
  const slots = new Map<string, ResidentSlot>();
  const basesKeys = new Set<string>();
  let bytes = 0;
  let anyCompressed = false;
  for (const [path, part] of parts.slots) {
    if (part.kind === 'raw') {
      const key = checkedSlot(parts.id, file, path, shape, part.inFeatures, part.outFeatures);
      const a = factor(dtype, part.rank, part.inFeatures, part.a, `${path}.lora_A`, file);
      const bt = factor(dtype, part.rank, part.outFeatures, transposed(part.b, part.outFeatures, part.rank), `${path}.lora_B`, file);
      setOnce(slots, key, { kind: 'raw', rank: part.rank, a, bt }, parts.id, file, path);
      bytes += bytesOf(a) + bytesOf(bt);
      continue;
    }
    const shared = bases.get(part.basesKey);
    if (!shared) throw new SoppuError('INTERNAL', `adapter ${parts.id}: shared bases ${part.basesKey} were not loaded`, { tensor: path });
    const key = checkedSlot(parts.id, file, path, shape, shared.a.cols, shared.bt.cols);
    const expectedCore = part.diagonal ? part.rank : part.rank * part.rank;
    if (part.rank !== shared.rank || part.core.length !== expectedCore) {
      throw new SoppuError(
        'BANK_CORRUPT',
        `adapter ${parts.id}: core of ${path} has rank ${part.rank} and ${part.core.length} values, shared bases ${part.basesKey} have rank ${shared.rank}`,
        { file, tensor: path, limit: expectedCore },
      );
    }
    checkFinite(parts.id, file, path, part.core);
    const core = factor(dtype, 1, part.core.length, part.core, `${path}.core`, file).data;
    setOnce(slots, key, { kind: 'compressed', rank: part.rank, bases: shared, core: { rank: part.rank, diagonal: part.diagonal, dtype, data: core } }, parts.id, file, path);
    basesKeys.add(part.basesKey);
    bytes += core.byteLength;
    anyCompressed = true;
  }
  return {
    id: parts.id,
    source: 'bank',
    storage: anyCompressed ? 'compressed' : 'raw',
    cluster: parts.cluster,
    slots,
    bytes,
    basesKeys: [...basesKeys],
  };
}
