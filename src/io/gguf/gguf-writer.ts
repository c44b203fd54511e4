/**
 * A small GGUF v3 serializer (the llama.cpp file format).
 *
 * Layout: magic "GGUF", u32 version 3, u64 tensor count, u64 metadata count, the metadata key/value
 * pairs (typed), the tensor infos (name, dims in GGML order = reversed row-major shape, ggml type,
 * u64 offset relative to the data section), zero padding to `general.alignment`, then the data
 * section with every tensor starting at a multiple of the alignment. All integers little-endian.
 */
import { SoppuError } from '../../errors/soppu-error.js';
import { writeFileAtomic } from '../safetensors.js';

/** GGUF metadata value types (gguf_type). */
export const GGUF_VALUE_TYPE = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;

/** The ggml tensor types this writer emits (ggml_type ids). */
export const GGML_TYPE = { F32: 0, F16: 1, BF16: 30 } as const;
export type GgmlTypeName = keyof typeof GGML_TYPE;

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian u32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

/** One typed metadata value. Arrays hold scalars of one type (no nested arrays). */
export type GgufValue =
  | { readonly type: 'uint8' | 'int8' | 'uint16' | 'int16' | 'uint32' | 'int32' | 'float32' | 'uint64' | 'int64' | 'float64'; readonly value: number }
  | { readonly type: 'bool'; readonly value: boolean }
  | { readonly type: 'string'; readonly value: string }
  | { readonly type: 'array'; readonly elementType: 'string'; readonly value: readonly string[] }
  | { readonly type: 'array'; readonly elementType: 'int32' | 'uint32' | 'float32'; readonly value: ArrayLike<number> };

/** One tensor to write. `shape` is row-major (PyTorch/safetensors order); data must match type and size. */
export interface GgufTensor {
  readonly name: string;
  readonly type: GgmlTypeName;
  readonly shape: readonly number[];
  /** F32: Float32Array; F16/BF16: Uint16Array of raw bits. */
  readonly data: Float32Array | Uint16Array;
}

const SCALAR_TYPES: Readonly<Record<string, number>> = {
  uint8: GGUF_VALUE_TYPE.UINT8,
  int8: GGUF_VALUE_TYPE.INT8,
  uint16: GGUF_VALUE_TYPE.UINT16,
  int16: GGUF_VALUE_TYPE.INT16,
  uint32: GGUF_VALUE_TYPE.UINT32,
  int32: GGUF_VALUE_TYPE.INT32,
  float32: GGUF_VALUE_TYPE.FLOAT32,
  bool: GGUF_VALUE_TYPE.BOOL,
  string: GGUF_VALUE_TYPE.STRING,
  uint64: GGUF_VALUE_TYPE.UINT64,
  int64: GGUF_VALUE_TYPE.INT64,
  float64: GGUF_VALUE_TYPE.FLOAT64,
};

/** Growable little-endian byte buffer for the header. */
class ByteSink {
  private buffer = new Uint8Array(1 << 16);
  private view = new DataView(this.buffer.buffer);
  length = 0;
  private readonly encoder = new TextEncoder();

  private reserve(extra: number): void {
    if (this.length + extra <= this.buffer.length) return;
    let size = this.buffer.length * 2;
    while (size < this.length + extra) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buffer.subarray(0, this.length));
    this.buffer = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number): void {
    this.reserve(1);
    this.view.setUint8(this.length, v);
    this.length += 1;
  }
  i8(v: number): void {
    this.reserve(1);
    this.view.setInt8(this.length, v);
    this.length += 1;
  }
  u16(v: number): void {
    this.reserve(2);
    this.view.setUint16(this.length, v, true);
    this.length += 2;
  }
  i16(v: number): void {
    this.reserve(2);
    this.view.setInt16(this.length, v, true);
    this.length += 2;
  }
  u32(v: number): void {
    this.reserve(4);
    this.view.setUint32(this.length, v, true);
    this.length += 4;
  }
  i32(v: number): void {
    this.reserve(4);
    this.view.setInt32(this.length, v, true);
    this.length += 4;
  }
  f32(v: number): void {
    this.reserve(4);
    this.view.setFloat32(this.length, v, true);
    this.length += 4;
  }
  f64(v: number): void {
    this.reserve(8);
    this.view.setFloat64(this.length, v, true);
    this.length += 8;
  }
  u64(v: number): void {
    this.reserve(8);
    this.view.setBigUint64(this.length, BigInt(v), true);
    this.length += 8;
  }
  i64(v: number): void {
    this.reserve(8);
    this.view.setBigInt64(this.length, BigInt(v), true);
    this.length += 8;
  }
  string(s: string): void {
    const bytes = this.encoder.encode(s);
    this.u64(bytes.length);
    this.reserve(bytes.length);
    this.buffer.set(bytes, this.length);
    this.length += bytes.length;
  }
  zeros(count: number): void {
    this.reserve(count);
    this.buffer.fill(0, this.length, this.length + count);
    this.length += count;
  }
  bytes(): Uint8Array {
    return this.buffer.slice(0, this.length);
  }
}

function writeScalar(sink: ByteSink, type: string, value: number | boolean | string, key: string): void {
  if (type === 'string') return sink.string(value as string);
  if (type === 'bool') return sink.u8(value ? 1 : 0);
  const n = value as number;
  const integer = type !== 'float32' && type !== 'float64';
  if (typeof n !== 'number' || !Number.isFinite(n) || (integer && !Number.isSafeInteger(n))) {
    throw new SoppuError('INTERNAL', `GGUF metadata "${key}": ${JSON.stringify(value)} is not a valid ${type}`, { field: key });
  }
  switch (type) {
    case 'uint8': return sink.u8(n);
    case 'int8': return sink.i8(n);
    case 'uint16': return sink.u16(n);
    case 'int16': return sink.i16(n);
    case 'uint32': return sink.u32(n);
    case 'int32': return sink.i32(n);
    case 'float32': return sink.f32(n);
    case 'float64': return sink.f64(n);
    case 'uint64': return sink.u64(n);
    case 'int64': return sink.i64(n);
    default: throw new SoppuError('INTERNAL', `GGUF metadata "${key}": unknown value type ${type}`, { field: key });
  }
}

function elementBytes(type: GgmlTypeName): number {
  return type === 'F32' ? 4 : 2;
}

/** The serialized file: header bytes (padded to the alignment) and one padded chunk per tensor. */
export interface SerializedGguf {
  readonly chunks: readonly Uint8Array[];
  readonly byteLength: number;
  /** Offset of each tensor relative to the data section, by name. */
  readonly offsets: ReadonlyMap<string, number>;
}

/**
 * Serialize metadata and tensors into GGUF v3 chunks. `general.alignment` is taken from the metadata
 * when present (a uint32 power of two), else 32, and written explicitly either way.
 */
export function serializeGguf(metadata: ReadonlyMap<string, GgufValue>, tensors: readonly GgufTensor[]): SerializedGguf {
  const alignmentValue = metadata.get('general.alignment');
  const alignment = alignmentValue && alignmentValue.type === 'uint32' ? alignmentValue.value : GGUF_DEFAULT_ALIGNMENT;
  if (!Number.isSafeInteger(alignment) || alignment < 1 || (alignment & (alignment - 1)) !== 0) {
    throw new SoppuError('INTERNAL', `GGUF metadata "general.alignment" must be a power of two (got ${alignment})`, { field: 'general.alignment' });
  }
  const entries = new Map(metadata);
  entries.set('general.alignment', { type: 'uint32', value: alignment });

  const sink = new ByteSink();
  sink.u32(GGUF_MAGIC);
  sink.u32(GGUF_VERSION);
  sink.u64(tensors.length);
  sink.u64(entries.size);
  for (const [key, value] of entries) {
    sink.string(key);
    if (value.type === 'array') {
      sink.u32(GGUF_VALUE_TYPE.ARRAY);
      sink.u32(SCALAR_TYPES[value.elementType]!);
      sink.u64(value.value.length);
      for (let i = 0; i < value.value.length; i++) writeScalar(sink, value.elementType, value.value[i]!, key);
    } else {
      sink.u32(SCALAR_TYPES[value.type]!);
      writeScalar(sink, value.type, value.value, key);
    }
  }

  const names = new Set<string>();
  const offsets = new Map<string, number>();
  const dataChunks: Uint8Array[] = [];
  let offset = 0;
  for (const tensor of tensors) {
    if (names.has(tensor.name)) throw new SoppuError('INTERNAL', `GGUF tensor "${tensor.name}" is written twice`, { tensor: tensor.name });
    names.add(tensor.name);
    const count = tensor.shape.reduce((a, b) => a * b, 1);
    const expectedArray = tensor.type === 'F32' ? Float32Array : Uint16Array;
    if (!(tensor.data instanceof expectedArray) || tensor.data.length !== count || tensor.shape.length < 1 || tensor.shape.length > 4) {
      throw new SoppuError('INTERNAL', `GGUF tensor "${tensor.name}": ${tensor.type} data of ${tensor.data.length} elements does not match shape [${tensor.shape.join(', ')}] (1 to 4 dims)`, { tensor: tensor.name });
    }
    sink.string(tensor.name);
    sink.u32(tensor.shape.length);
    // GGML order: ne[0] is the fastest-varying (last row-major) dimension
    for (let d = tensor.shape.length - 1; d >= 0; d--) sink.u64(tensor.shape[d]!);
    sink.u32(GGML_TYPE[tensor.type]);
    sink.u64(offset);
    offsets.set(tensor.name, offset);
    const bytes = new Uint8Array(tensor.data.buffer, tensor.data.byteOffset, count * elementBytes(tensor.type));
    dataChunks.push(bytes);
    const padding = (alignment - (bytes.length % alignment)) % alignment;
    if (padding > 0) dataChunks.push(new Uint8Array(padding));
    offset += bytes.length + padding;
  }
  sink.zeros((alignment - (sink.length % alignment)) % alignment);
  const header = sink.bytes();
  return { chunks: [header, ...dataChunks], byteLength: header.length + offset, offsets };
}

/** Serialize and write a GGUF file atomically. Returns the file size in bytes. */
export async function writeGguf(path: string, metadata: ReadonlyMap<string, GgufValue>, tensors: readonly GgufTensor[]): Promise<number> {
  const serialized = serializeGguf(metadata, tensors);
  await writeFileAtomic(path, serialized.chunks);
  return serialized.byteLength;
}
