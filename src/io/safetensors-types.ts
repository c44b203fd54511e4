/**
 * The safetensors API every layer uses (implemented in src/io/safetensors.ts).
 * Reading is lazy: opening parses and validates the header only; each tensor is read when asked.
 */
import type { StDtype } from '../tensor/dtype.js';

export interface TensorInfo {
  readonly name: string;
  readonly dtype: StDtype;
  readonly shape: readonly number[];
  /** Byte offsets relative to the start of the data section: [begin, end). */
  readonly dataOffsets: readonly [number, number];
}

/** Typed array for a dtype: F32→Float32Array, F64→Float64Array, F16/BF16→Uint16Array (raw bits), I64→BigInt64Array, I32→Int32Array, I16→Int16Array, I8→Int8Array, U8/BOOL→Uint8Array. */
export type TensorData = Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array;

export interface SafetensorsFile {
  readonly path: string;
  readonly metadata: Readonly<Record<string, string>>;
  /** Tensor infos in file order (sorted by offset). */
  readonly tensors: readonly TensorInfo[];
  get(name: string): TensorInfo | undefined;
  /** Reads one tensor's bytes into a fresh, aligned typed array of its dtype. */
  read(name: string): Promise<TensorData>;
  /** Reads one tensor's bytes into `target`, which must be exactly their length (a caller's own memory). */
  readInto(name: string, target: Uint8Array): Promise<void>;
  /** Reads one tensor and widens F32/F16/BF16/F64 to a Float32Array. */
  readF32(name: string): Promise<Float32Array>;
  close(): Promise<void>;
}

/** A tensor to write. `data` must match dtype (Uint16Array for F16/BF16 bits) and shape. */
export interface TensorToWrite {
  readonly name: string;
  readonly dtype: StDtype;
  readonly shape: readonly number[];
  readonly data: TensorData;
}
