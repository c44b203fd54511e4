/**
 * safetensors read/write, safe against hostile input.
 *
 * Format: 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON (an object: tensor name →
 * {dtype, shape, data_offsets}, plus an optional "__metadata__" string→string map), then the data
 * section. data_offsets are [begin, end) relative to the data section; sorted by begin the tensors
 * must tile the data section exactly (no gaps, no overlap, nothing after the last one).
 *
 * Reading is lazy: open reads the header only (positional reads on a file descriptor) and `read`
 * reads one tensor's bytes. Writing is atomic (temp file in the same directory, fsync, rename, fsync
 * of the directory) and deterministic (tensors sorted by name, stable key order, data 8-byte aligned).
 */
import { unlinkSync } from 'node:fs';
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { SoppuError } from '../errors/soppu-error.js';
import { ST_DTYPE_BYTES, bf16ArrayToF32, f16ArrayToF32, type StDtype } from '../tensor/dtype.js';
import type { SafetensorsFile, TensorData, TensorInfo, TensorToWrite } from './safetensors-types.js';

/** Limits applied while parsing a header; every one is configurable. */
export interface SafetensorsLimits {
  /** Largest accepted JSON header, in bytes. */
  readonly maxHeaderBytes: number;
  /** Most tensors in one file. */
  readonly maxTensors: number;
  /** Most dimensions of one tensor. */
  readonly maxRank: number;
  /** Most elements in one tensor. */
  readonly maxElements: number;
  /** Longest tensor name or metadata key, in UTF-16 code units. */
  readonly maxNameLength: number;
  /** Most `__metadata__` entries. */
  readonly maxMetadataEntries: number;
}

export const DEFAULT_SAFETENSORS_LIMITS: SafetensorsLimits = {
  maxHeaderBytes: 100 * 1024 * 1024,
  maxTensors: 1_000_000,
  maxRank: 8,
  maxElements: 2 ** 40,
  maxNameLength: 1024,
  maxMetadataEntries: 10_000,
};

const DTYPES: readonly StDtype[] = ['F64', 'F32', 'F16', 'BF16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL'];
const ENTRY_KEYS = new Set(['dtype', 'shape', 'data_offsets']);
const METADATA_KEY = '__metadata__';
/** Control characters and lone surrogates are refused in names. */
const BAD_NAME_CHARS = /[\p{Cc}\p{Cs}]/u;

/** Parsed header: metadata and tensor infos sorted by offset. */
export interface SafetensorsHeader {
  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: readonly TensorInfo[];
}

function headerError(file: string, message: string, context: Record<string, unknown> = {}): SoppuError {
  return new SoppuError('SAFETENSORS_HEADER', `${file}: ${message}`, { file, ...context });
}

function tensorError(file: string, tensor: string, message: string, context: Record<string, unknown> = {}): SoppuError {
  return new SoppuError('SAFETENSORS_TENSOR', `${file}: tensor "${tensor}": ${message}`, { file, tensor, ...context });
}

function isSafeNonNegativeInteger(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function printableName(name: string): string {
  return name.length > 80 ? `${name.slice(0, 80)}…` : name;
}

/**
 * A short rendering of an untrusted JSON value for an error message: numbers and strings (truncated)
 * as is, anything else by its type. Never stringifies a structure: it may be thousands of levels deep.
 */
function describeValue(v: unknown): string {
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return String(v);
  if (typeof v === 'string') return JSON.stringify(printableName(v));
  if (v === null) return 'null';
  if (Array.isArray(v)) return `an array of ${v.length}`;
  return typeof v === 'object' ? 'an object' : typeof v;
}

function checkName(file: string, name: string, what: string, limits: SafetensorsLimits): void {
  const shown = JSON.stringify(printableName(name));
  if (name.length === 0) throw headerError(file, `${what} name is empty`, { field: what });
  if (name.length > limits.maxNameLength) {
    throw headerError(file, `${what} name ${shown} is ${name.length} characters (limit ${limits.maxNameLength})`, { tensor: name, limit: limits.maxNameLength });
  }
  if (BAD_NAME_CHARS.test(name)) throw headerError(file, `${what} name ${shown} contains control characters or lone surrogates`, { tensor: name });
}

/**
 * Finds a duplicate key in any object of an already-validated JSON text (JSON.parse keeps the
 * last duplicate silently). Returns the first duplicate, or null.
 */
function findDuplicateKey(text: string): string | null {
  const stack: Array<{ keys: Set<string> | null; expectKey: boolean }> = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x7b /* { */) stack.push({ keys: new Set(), expectKey: true });
    else if (c === 0x5b /* [ */) stack.push({ keys: null, expectKey: false });
    else if (c === 0x7d /* } */ || c === 0x5d /* ] */) stack.pop();
    else if (c === 0x2c /* , */) {
      const top = stack[stack.length - 1];
      if (top?.keys) top.expectKey = true;
    } else if (c === 0x22 /* " */) {
      const start = i;
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 0x5c) i++;
        else if (d === 0x22) break;
      }
      const top = stack[stack.length - 1];
      if (top?.keys && top.expectKey) {
        const key = JSON.parse(text.slice(start, i + 1)) as string;
        if (top.keys.has(key)) return key;
        top.keys.add(key);
        top.expectKey = false;
      }
    }
  }
  return null;
}

/**
 * Parses and validates a header. `headerBytes` is the JSON (N bytes after the length prefix);
 * `dataLength` is the size of the data section. Throws SoppuError on any violation.
 */
export function parseSafetensorsHeader(
  headerBytes: Uint8Array,
  dataLength: number,
  file: string,
  limits: SafetensorsLimits = DEFAULT_SAFETENSORS_LIMITS,
): SafetensorsHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    throw headerError(file, 'header is not valid UTF-8');
  }
  checkHeaderStructure(text, file, limits);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw headerError(file, `header is not valid JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw headerError(file, `header must be a JSON object, got ${Array.isArray(parsed) ? 'an array' : parsed === null ? 'null' : typeof parsed}`);
  }
  const duplicate = findDuplicateKey(text);
  if (duplicate !== null) throw headerError(file, `header has the key ${JSON.stringify(printableName(duplicate))} more than once`, { tensor: duplicate });

  const entries = Object.entries(parsed as Record<string, unknown>);
  let metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  const tensorCount = entries.length - (Object.hasOwn(parsed, METADATA_KEY) ? 1 : 0);
  if (tensorCount > limits.maxTensors) throw headerError(file, `header lists ${tensorCount} tensors (limit ${limits.maxTensors})`, { limit: limits.maxTensors });

  for (const [name, value] of entries) {
    if (name === METADATA_KEY) {
      metadata = parseMetadata(file, value, limits);
      continue;
    }
    checkName(file, name, 'tensor', limits);
    tensors.push(parseEntry(file, name, value, dataLength, limits));
  }

  // Sorted by begin (zero-sized tensors first at a shared offset) they must tile the data section.
  tensors.sort((x, y) => x.dataOffsets[0] - y.dataOffsets[0] || x.dataOffsets[1] - y.dataOffsets[1] || (x.name < y.name ? -1 : 1));
  let cursor = 0;
  for (const t of tensors) {
    const [begin, end] = t.dataOffsets;
    if (begin < cursor) throw tensorError(file, t.name, `data_offsets [${begin}, ${end}) overlap the previous tensor, which ends at ${cursor}`, { limit: cursor });
    if (begin > cursor) throw tensorError(file, t.name, `data_offsets [${begin}, ${end}) leave a gap after byte ${cursor} of the data section`, { limit: cursor });
    cursor = end;
  }
  if (cursor !== dataLength) {
    throw headerError(file, `tensors cover ${cursor} bytes but the data section holds ${dataLength} bytes`, { limit: dataLength });
  }
  return { metadata, tensors };
}

/**
 * One pass over the header text, before JSON.parse builds it: a header of `maxTensors` tensors holds at most
 * 3 containers (entry, shape, data_offsets) and 3 + maxRank + 2 commas per tensor, plus __metadata__'s. JSON.parse
 * of a 100 MiB header of nested brackets took ~50× its size in memory (past Node's heap: an abort no catch
 * sees), and 30 M empty objects ~3 GB, before any check ran. Within these counts the parse stays bounded.
 */
function checkHeaderStructure(text: string, file: string, limits: SafetensorsLimits): void {
  // (with room to spare: a small header over a limit gets the detailed error that names its tensor)
  const maxContainers = 3 * limits.maxTensors + 1024;
  const maxCommas = (3 + limits.maxRank + 2) * limits.maxTensors + limits.maxMetadataEntries + 1024;
  let containers = 0;
  let commas = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x7b || c === 0x5b) {
      if (++containers > maxContainers) throw headerError(file, `header holds more than ${maxContainers} JSON objects and arrays (what ${limits.maxTensors} tensors can have)`, { limit: maxContainers });
    } else if (c === 0x2c && ++commas > maxCommas) {
      throw headerError(file, `header holds more than ${maxCommas} JSON values (what ${limits.maxTensors} tensors of rank ${limits.maxRank} can have)`, { limit: maxCommas });
    }
  }
}

function parseMetadata(file: string, value: unknown, limits: SafetensorsLimits): Record<string, string> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw headerError(file, '__metadata__ must be an object of strings', { field: METADATA_KEY });
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > limits.maxMetadataEntries) {
    throw headerError(file, `__metadata__ has ${entries.length} entries (limit ${limits.maxMetadataEntries})`, { field: METADATA_KEY, limit: limits.maxMetadataEntries });
  }
  const metadata: Record<string, string> = {};
  for (const [key, v] of entries) {
    checkName(file, key, 'metadata key', limits);
    if (typeof v !== 'string') throw headerError(file, `__metadata__ value for ${JSON.stringify(printableName(key))} must be a string, got ${typeof v}`, { field: key });
    Object.defineProperty(metadata, key, { value: v, enumerable: true, writable: false, configurable: false });
  }
  return metadata;
}

function parseEntry(file: string, name: string, value: unknown, dataLength: number, limits: SafetensorsLimits): TensorInfo {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw tensorError(file, name, 'entry must be an object with dtype, shape and data_offsets');
  const entry = value as Record<string, unknown>;
  for (const key of Object.keys(entry)) {
    if (!ENTRY_KEYS.has(key)) throw tensorError(file, name, `unknown field ${JSON.stringify(printableName(key))} (allowed: dtype, shape, data_offsets)`, { field: key });
  }
  const dtype = entry['dtype'];
  if (typeof dtype !== 'string') throw tensorError(file, name, 'dtype must be a string', { field: 'dtype' });
  if (!(DTYPES as readonly string[]).includes(dtype)) {
    throw new SoppuError('SAFETENSORS_DTYPE', `${file}: tensor "${name}": dtype ${JSON.stringify(printableName(dtype))} is not supported (supported: ${DTYPES.join(', ')})`, { file, tensor: name, field: 'dtype' });
  }
  const shape = entry['shape'];
  if (!Array.isArray(shape)) throw tensorError(file, name, 'shape must be an array of non-negative integers', { field: 'shape' });
  if (shape.length > limits.maxRank) throw tensorError(file, name, `shape has ${shape.length} dimensions (limit ${limits.maxRank})`, { field: 'shape', limit: limits.maxRank });
  // Every entry is checked before any is rendered: the shape is joined into messages below.
  for (const dim of shape) {
    if (!isSafeNonNegativeInteger(dim)) throw tensorError(file, name, `shape entry ${describeValue(dim)} is not a non-negative safe integer`, { field: 'shape' });
  }
  let elements = 1;
  for (const dim of shape as number[]) {
    elements *= dim;
    if (elements > limits.maxElements) {
      throw tensorError(file, name, `shape [${shape.join(', ')}] exceeds ${limits.maxElements} elements`, { field: 'shape', limit: limits.maxElements });
    }
  }
  const offsets = entry['data_offsets'];
  if (!Array.isArray(offsets) || offsets.length !== 2 || !isSafeNonNegativeInteger(offsets[0]) || !isSafeNonNegativeInteger(offsets[1])) {
    throw tensorError(file, name, 'data_offsets must be [begin, end] with non-negative safe integers', { field: 'data_offsets' });
  }
  const begin = offsets[0] as number;
  const end = offsets[1] as number;
  if (begin > end) throw tensorError(file, name, `data_offsets [${begin}, ${end}) end before they begin`, { field: 'data_offsets' });
  if (end > dataLength) throw tensorError(file, name, `data_offsets [${begin}, ${end}) run past the data section of ${dataLength} bytes`, { field: 'data_offsets', limit: dataLength });
  const expectedBytes = elements * ST_DTYPE_BYTES[dtype as StDtype];
  if (end - begin !== expectedBytes) {
    throw tensorError(file, name, `holds ${end - begin} bytes but ${dtype} [${shape.join(', ')}] needs ${expectedBytes}`, { field: 'data_offsets', limit: expectedBytes });
  }
  return { name, dtype: dtype as StDtype, shape: Object.freeze([...shape] as number[]), dataOffsets: [begin, end] };
}

/** Reads exactly `length` bytes at `position` into `target`, or fails naming the file. */
async function readFully(handle: FileHandle, target: Uint8Array, position: number, file: string, what: string): Promise<void> {
  let done = 0;
  while (done < target.length) {
    const { bytesRead } = await handle.read(target, done, target.length - done, position + done);
    if (bytesRead === 0) {
      throw new SoppuError('SAFETENSORS_TENSOR', `${file}: ${what}: file ended after ${position + done} bytes (was it truncated while open?)`, { file, tensor: what });
    }
    done += bytesRead;
  }
}

function ioError(file: string, action: string, e: unknown): SoppuError {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT' && action !== 'write') return new SoppuError('FILE_NOT_FOUND', `${file}: no such file`, { file }, { cause: e });
  return new SoppuError('FILE_IO', `${file}: cannot ${action} (${e instanceof Error ? e.message : String(e)})`, { file }, { cause: e });
}

/** Typed array of a dtype over a fresh buffer holding exactly the tensor's bytes. */
function typedArrayOf(dtype: StDtype, buffer: ArrayBuffer): TensorData {
  switch (dtype) {
    case 'F64': return new Float64Array(buffer);
    case 'F32': return new Float32Array(buffer);
    case 'F16':
    case 'BF16': return new Uint16Array(buffer);
    case 'I64': return new BigInt64Array(buffer);
    case 'I32': return new Int32Array(buffer);
    case 'I16': return new Int16Array(buffer);
    case 'I8': return new Int8Array(buffer);
    case 'U8':
    case 'BOOL': return new Uint8Array(buffer);
  }
}

/** A typed array of `dtype` over a copy of `bytes` (length must be a multiple of the element size). */
export function tensorDataFromBytes(dtype: StDtype, bytes: Uint8Array): TensorData {
  // Uint8Array.prototype.slice copies even for a Node Buffer, whose own slice() would share memory.
  return typedArrayOf(dtype, Uint8Array.prototype.slice.call(bytes).buffer);
}

/** Widens F32/F16/BF16/F64 data to a Float32Array (F32 is returned as is). */
export function toFloat32(info: TensorInfo, data: TensorData, file = ''): Float32Array {
  switch (info.dtype) {
    case 'F32': return data as Float32Array;
    case 'F16': return f16ArrayToF32(data as Uint16Array);
    case 'BF16': return bf16ArrayToF32(data as Uint16Array);
    case 'F64': return Float32Array.from(data as Float64Array);
    default:
      throw new SoppuError('SAFETENSORS_DTYPE', `${file}: tensor "${info.name}": dtype ${info.dtype} cannot be read as floating point (expected F32, F16, BF16 or F64)`, { file, tensor: info.name, field: 'dtype' });
  }
}

class LazySafetensorsFile implements SafetensorsFile {
  private readonly byName: Map<string, TensorInfo>;
  private handle: FileHandle | null;

  constructor(
    readonly path: string,
    handle: FileHandle,
    private readonly dataStart: number,
    header: SafetensorsHeader,
  ) {
    this.handle = handle;
    this.metadata = header.metadata;
    this.tensors = header.tensors;
    this.byName = new Map(header.tensors.map((t) => [t.name, t]));
  }

  readonly metadata: Readonly<Record<string, string>>;
  readonly tensors: readonly TensorInfo[];

  get(name: string): TensorInfo | undefined {
    return this.byName.get(name);
  }

  async read(name: string): Promise<TensorData> {
    const info = this.infoOf(name);
    const [begin, end] = info.dataOffsets;
    const buffer = new ArrayBuffer(end - begin);
    await this.readInto(name, new Uint8Array(buffer));
    return typedArrayOf(info.dtype, buffer);
  }

  async readInto(name: string, target: Uint8Array): Promise<void> {
    const [begin, end] = this.infoOf(name).dataOffsets;
    if (target.byteLength !== end - begin) {
      throw new SoppuError('INTERNAL', `${this.path}: tensor "${printableName(name)}" has ${end - begin} bytes, its target ${target.byteLength}`, { file: this.path, tensor: name });
    }
    if (!this.handle) throw new SoppuError('FILE_IO', `${this.path}: read of "${name}" after close`, { file: this.path, tensor: name });
    if (end === begin) return;
    try {
      await readFully(this.handle, target, this.dataStart + begin, this.path, `tensor "${name}"`);
    } catch (e) {
      if (e instanceof SoppuError) throw e;
      throw ioError(this.path, `read tensor "${name}"`, e);
    }
  }

  private infoOf(name: string): TensorInfo {
    const info = this.byName.get(name);
    if (!info) throw new SoppuError('SAFETENSORS_TENSOR', `${this.path}: no tensor named "${printableName(name)}"`, { file: this.path, tensor: name });
    return info;
  }

  async readF32(name: string): Promise<Float32Array> {
    const info = this.byName.get(name);
    if (info && !['F32', 'F16', 'BF16', 'F64'].includes(info.dtype)) return toFloat32(info, new Uint8Array(0), this.path);
    const data = await this.read(name);
    return toFloat32(info!, data, this.path);
  }

  async close(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    if (handle) await handle.close();
  }
}

/**
 * Opens a safetensors file: reads and validates the header only. Tensors are read on demand.
 * Throws SoppuError (SAFETENSORS_HEADER / SAFETENSORS_TENSOR / SAFETENSORS_DTYPE, FILE_NOT_FOUND, FILE_IO).
 */
export async function openSafetensors(path: string, limits: Partial<SafetensorsLimits> = {}): Promise<SafetensorsFile> {
  const effective: SafetensorsLimits = { ...DEFAULT_SAFETENSORS_LIMITS, ...limits };
  let handle: FileHandle;
  try {
    handle = await open(path, 'r');
  } catch (e) {
    throw ioError(path, 'open', e);
  }
  try {
    let size: number;
    try {
      const stat = await handle.stat();
      if (!stat.isFile()) throw new SoppuError('FILE_IO', `${path}: not a regular file`, { file: path });
      size = stat.size;
    } catch (e) {
      if (e instanceof SoppuError) throw e;
      throw ioError(path, 'stat', e);
    }
    if (size < 8) throw headerError(path, `file is ${size} bytes, shorter than the 8-byte header length`, { limit: 8 });
    const prefix = new Uint8Array(8);
    await readFully(handle, prefix, 0, path, 'header length');
    const headerLength = new DataView(prefix.buffer).getBigUint64(0, true);
    if (headerLength > BigInt(effective.maxHeaderBytes)) {
      throw headerError(path, `header length ${headerLength} exceeds the limit of ${effective.maxHeaderBytes} bytes`, { limit: effective.maxHeaderBytes });
    }
    const headerBytes = Number(headerLength);
    if (8 + headerBytes > size) throw headerError(path, `header length ${headerBytes} runs past the end of the ${size}-byte file`, { limit: size - 8 });
    if (headerBytes < 2) throw headerError(path, `header length ${headerBytes} is too short for a JSON object`, { limit: 2 });
    const header = new Uint8Array(headerBytes);
    await readFully(handle, header, 8, path, 'header');
    const parsed = parseSafetensorsHeader(header, size - 8 - headerBytes, path, effective);
    return new LazySafetensorsFile(path, handle, 8 + headerBytes, parsed);
  } catch (e) {
    await handle.close().catch(() => undefined);
    throw e;
  }
}

const TYPED_ARRAY_OF_DTYPE: Readonly<Record<StDtype, string>> = {
  F64: 'Float64Array', F32: 'Float32Array', F16: 'Uint16Array', BF16: 'Uint16Array', I64: 'BigInt64Array',
  I32: 'Int32Array', I16: 'Int16Array', I8: 'Int8Array', U8: 'Uint8Array', BOOL: 'Uint8Array',
};

/** Header JSON text (unpadded) plus byte views of the data, in write order. */
export interface SerializedSafetensors {
  readonly header: Uint8Array;
  readonly chunks: readonly Uint8Array[];
  readonly totalBytes: number;
}

/**
 * Builds the header (tensors sorted by name, keys in a stable order, padded with spaces so the data
 * section starts 8-byte aligned) and the list of data chunks. Validates every tensor.
 */
export function serializeSafetensors(file: string, tensors: readonly TensorToWrite[], metadata: Readonly<Record<string, string>> = {}): SerializedSafetensors {
  const sorted = [...tensors].sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0));
  const limits = DEFAULT_SAFETENSORS_LIMITS;
  const parts: string[] = [];
  const metadataKeys = Object.keys(metadata).sort();
  if (metadataKeys.length > 0) {
    const inner = metadataKeys.map((key) => {
      checkName(file, key, 'metadata key', limits);
      const value = metadata[key];
      if (typeof value !== 'string') throw headerError(file, `__metadata__ value for ${JSON.stringify(key)} must be a string`, { field: key });
      return `${JSON.stringify(key)}:${JSON.stringify(value)}`;
    });
    parts.push(`${JSON.stringify(METADATA_KEY)}:{${inner.join(',')}}`);
  }
  const chunks: Uint8Array[] = [];
  let offset = 0;
  let previous: string | null = null;
  for (const t of sorted) {
    checkName(file, t.name, 'tensor', limits);
    if (t.name === METADATA_KEY) throw tensorError(file, t.name, 'tensor name is reserved');
    if (t.name === previous) throw tensorError(file, t.name, 'tensor name given more than once');
    previous = t.name;
    if (!(DTYPES as readonly string[]).includes(t.dtype)) {
      throw new SoppuError('SAFETENSORS_DTYPE', `${file}: tensor "${t.name}": dtype ${t.dtype} is not supported`, { file, tensor: t.name });
    }
    let elements = 1;
    for (const dim of t.shape) {
      if (!isSafeNonNegativeInteger(dim)) throw tensorError(file, t.name, `shape entry ${describeValue(dim)} is not a non-negative integer`, { field: 'shape' });
      elements *= dim;
    }
    const expectedType = TYPED_ARRAY_OF_DTYPE[t.dtype];
    if (t.data.constructor.name !== expectedType) {
      throw new SoppuError('SAFETENSORS_DTYPE', `${file}: tensor "${t.name}": ${t.dtype} data must be a ${expectedType}, got ${t.data.constructor.name}`, { file, tensor: t.name });
    }
    if (t.data.length !== elements) {
      throw tensorError(file, t.name, `has ${t.data.length} elements but shape [${t.shape.join(', ')}] needs ${elements}`, { field: 'shape', limit: elements });
    }
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    parts.push(`${JSON.stringify(t.name)}:{"dtype":${JSON.stringify(t.dtype)},"shape":[${t.shape.join(',')}],"data_offsets":[${offset},${offset + bytes.length}]}`);
    chunks.push(bytes);
    offset += bytes.length;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const padded = Math.ceil((8 + json.length) / 8) * 8 - 8;
  const header = new Uint8Array(8 + padded).fill(0x20);
  new DataView(header.buffer).setBigUint64(0, BigInt(padded), true);
  header.set(json, 8);
  return { header, chunks, totalBytes: header.length + offset };
}

/** The whole file as one buffer (for small files and tests). */
export function safetensorsToBytes(tensors: readonly TensorToWrite[], metadata: Readonly<Record<string, string>> = {}): Uint8Array {
  const serialized = serializeSafetensors('<memory>', tensors, metadata);
  const out = new Uint8Array(serialized.totalBytes);
  out.set(serialized.header, 0);
  let offset = serialized.header.length;
  for (const chunk of serialized.chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

/** Temp files of writeFileAtomic calls in progress: an interrupted command removes them (removeUnfinishedWrites). */
const unfinishedWrites = new Set<string>();

/**
 * Deletes the temp files of writes still in progress, at once (for a signal handler about to exit): a
 * Ctrl-C during a large write (a GGUF export, a bank) left hidden files of gigabytes behind.
 */
export function removeUnfinishedWrites(): void {
  for (const temp of unfinishedWrites) {
    try {
      unlinkSync(temp);
    } catch {
      // already gone, or never created
    }
  }
  unfinishedWrites.clear();
}

/**
 * Writes `data` chunks to `path` atomically: a temp file in the same directory is written and
 * fsynced, renamed over `path`, and the directory is fsynced. On failure the temp file is removed;
 * on a signal, by removeUnfinishedWrites.
 */
export async function writeFileAtomic(path: string, chunks: readonly Uint8Array[]): Promise<void> {
  const directory = dirname(path);
  const temp = join(directory, `.${basename(path)}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
  let handle: FileHandle | null = null;
  unfinishedWrites.add(temp);
  try {
    handle = await open(temp, 'wx');
    for (const chunk of chunks) {
      let done = 0;
      while (done < chunk.length) {
        const { bytesWritten } = await handle.write(chunk, done, chunk.length - done);
        done += bytesWritten;
      }
    }
    await handle.sync();
    await handle.close();
    handle = null;
    await rename(temp, path);
  } catch (e) {
    if (handle) await handle.close().catch(() => undefined);
    await unlink(temp).catch(() => undefined);
    throw ioError(path, 'write', e);
  } finally {
    unfinishedWrites.delete(temp);
  }
  // Make the rename durable; some filesystems refuse fsync on a directory, which is harmless.
  try {
    const dir = await open(directory, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  } catch {
    /* directory fsync unsupported */
  }
}

/**
 * Writes a safetensors file atomically and deterministically: tensors sorted by name, stable key
 * order, header padded with spaces so the data section is 8-byte aligned.
 */
export async function writeSafetensors(path: string, tensors: readonly TensorToWrite[], metadata: Readonly<Record<string, string>> = {}): Promise<void> {
  const serialized = serializeSafetensors(path, tensors, metadata);
  await writeFileAtomic(path, [serialized.header, ...serialized.chunks]);
}
