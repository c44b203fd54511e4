/**
 * Reads adapter banks (format in bank-manifest.ts). Opening validates the manifest (schema, version,
 * cross-references) and that every data file exists with its recorded size; each data file's sha256 is
 * checked when it is first loaded, and every tensor's name, dtype and shape are checked against the
 * manifest. Anything wrong is a SoppuError(BANK_CORRUPT) naming the file, tensor or field.
 */
import { createHash } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { parseSafetensorsHeader, tensorDataFromBytes } from '../io/safetensors.js';
import type { TensorInfo } from '../io/safetensors-types.js';
import type { PassthroughTensor } from '../io/lora-types.js';
import type { BankAdapterParts, BankReader, BankSlotPart, SharedBases } from './bank-reader-types.js';
import {
  MANIFEST_NAME, PASSTHROUGH_PREFIX, basesKeyOf, parseBasesKey, parseManifest,
  type BankManifest, type ManifestAdapter, type ManifestSlot,
} from './bank-manifest.js';
import { sha256Hex } from './bank-writer.js';

/** A checksum-verified data file's header (bases files: verified once, then read by tensor range). */
interface VerifiedHeader {
  readonly path: string;
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly dataStart: number;
}

/** A loaded, checksum-verified data file. */
interface VerifiedFile {
  readonly path: string;
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly bytes: Uint8Array;
  readonly dataStart: number;
}

function corrupt(file: string, message: string, context: Record<string, unknown> = {}): SoppuError {
  return new SoppuError('BANK_CORRUPT', `${file}: ${message}`, { file, ...context });
}

/** Reads the manifest of the bank in `dir` and validates it (no data file is touched). */
export async function readManifest(dir: string): Promise<BankManifest> {
  const file = join(dir, MANIFEST_NAME);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new SoppuError('FILE_NOT_FOUND', `${file}: no bank here (manifest.json is missing)`, { file }, { cause: e });
    throw new SoppuError('FILE_IO', `${file}: cannot read (${(e as Error).message})`, { file }, { cause: e });
  }
  return parseManifest(text, file);
}

/** An open bank: the engine's BankReader plus the manifest and whole-adapter access for the CLI. */
export class Bank implements BankReader {
  private readonly adapterById: Map<string, ManifestAdapter>;
  private readonly slotByPath: Map<string, ManifestSlot>;
  private readonly sortedIds: readonly string[];
  /** Bases files verified so far (headers only: the reader keeps no tensor data). */
  private readonly verifiedBases = new Map<string, Promise<VerifiedHeader>>();

  constructor(readonly dir: string, readonly manifest: BankManifest) {
    this.adapterById = new Map(manifest.adapters.map((a) => [a.id, a]));
    this.slotByPath = new Map(manifest.slots.map((s) => [s.path, s]));
    this.sortedIds = Object.freeze([...this.adapterById.keys()].sort());
  }

  get baseModel(): string | null {
    return this.manifest.baseModel;
  }

  get slotShapes(): readonly { path: string; inFeatures: number; outFeatures: number }[] {
    return this.manifest.slots.map((s) => ({ path: s.path, inFeatures: s.inFeatures, outFeatures: s.outFeatures }));
  }

  ids(): readonly string[] {
    return this.sortedIds;
  }

  has(id: string): boolean {
    return this.adapterById.has(id);
  }

  hasCompressedSlots(id: string): boolean {
    const entry = this.adapterById.get(id);
    return entry !== undefined && Object.values(entry.perSlot).some((part) => part.storage === 'compressed');
  }

  basesOf(id: string): { key: string; elements: number }[] {
    const entry = this.adapterById.get(id);
    if (!entry) return [];
    return Object.entries(entry.perSlot)
      .filter(([, part]) => part.storage === 'compressed')
      .map(([path, part]) => {
        const slot = this.slot(path);
        return { key: this.basesKey(entry, path), elements: part.rank! * (slot.inFeatures + slot.outFeatures) };
      });
  }

  /** The key of the shared bases an adapter's slot multiplies, naming this version's bases file. */
  private basesKey(entry: ManifestAdapter, path: string): string {
    return basesKeyOf(entry.cluster, path, this.manifest.basesFiles[entry.cluster]);
  }

  /**
   * What `id`'s weights are in this version of the bank: its file, cluster and the cluster's bases file (all
   * content-addressed); null when the bank does not hold it. Equal fingerprints in two versions, equal weights.
   */
  fingerprint(id: string): string | null {
    const entry = this.adapterById.get(id);
    if (!entry) return null;
    return JSON.stringify([entry.file, entry.cluster, this.manifest.basesFiles[entry.cluster] ?? null]);
  }

  /** The manifest entry of one adapter; throws ADAPTER_NOT_FOUND. */
  adapter(id: string): ManifestAdapter {
    const entry = this.adapterById.get(id);
    if (!entry) throw new SoppuError('ADAPTER_NOT_FOUND', `${this.dir}: the bank holds no adapter "${id}"`, { file: this.dir, field: 'adapter_id' });
    return entry;
  }

  slot(path: string): ManifestSlot {
    const slot = this.slotByPath.get(path);
    if (!slot) throw corrupt(join(this.dir, MANIFEST_NAME), `slot "${path}" is not in the manifest`, { field: 'slots' });
    return slot;
  }

  async loadAdapter(id: string): Promise<BankAdapterParts> {
    const entry = this.adapter(id);
    const slots = new Map<string, BankSlotPart>();
    let bytes = 0;
    const stored = Object.entries(entry.perSlot).filter(([, p]) => p.storage !== 'zero');
    if (!entry.file) return { id, cluster: entry.cluster, slots, bytes, passthrough: [] };
    // adapter files are small: read whole and checksummed on every load, nothing is kept here
    const file = await this.readVerified(entry.file);
    const passthrough = [...file.tensors.keys()].filter((name) => name.startsWith(PASSTHROUGH_PREFIX)).map((name) => name.slice(PASSTHROUGH_PREFIX.length)).sort();
    for (const [path, part] of stored) {
      const slot = this.slot(path);
      const rank = part.rank!;
      if (part.storage === 'compressed') {
        const diagonal = slot.method === 'jd-diag';
        const core = this.tensor(file, `${path}.core`, diagonal ? [rank] : [rank, rank]);
        slots.set(path, { kind: 'compressed', path, basesKey: this.basesKey(entry, path), rank, diagonal, core });
        bytes += core.byteLength;
      } else {
        const a = this.tensor(file, `${path}.lora_A`, [rank, slot.inFeatures]);
        const b = this.tensor(file, `${path}.lora_B`, [slot.outFeatures, rank]);
        slots.set(path, { kind: 'raw', path, rank, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, a, b });
        bytes += a.byteLength + b.byteLength;
      }
    }
    return { id, cluster: entry.cluster, slots, bytes, passthrough };
  }

  async loadBases(key: string): Promise<SharedBases> {
    const manifestFile = join(this.dir, MANIFEST_NAME);
    const parsed = parseBasesKey(key);
    if (!parsed || parsed.cluster >= this.manifest.clusters) throw corrupt(manifestFile, `bases key "${key}" names no cluster of this bank`, { field: 'basesKey' });
    const slot = this.slot(parsed.path);
    const rank = slot.ranks[parsed.cluster];
    const basesFile = this.manifest.basesFiles[parsed.cluster];
    if (rank === null || rank === undefined || !basesFile) throw corrupt(manifestFile, `cluster ${parsed.cluster} has no bases for slot "${parsed.path}"`, { field: 'basesKey' });
    if (parsed.basesFile !== null && parsed.basesFile !== basesFile) {
      throw corrupt(manifestFile, `bases key "${key}" names ${parsed.basesFile}, this version of the bank holds ${basesFile}`, { field: 'basesKey' });
    }
    const header = await this.verifiedBasesHeader(basesFile);
    const u = await this.tensorFromRange(header, `${parsed.path}.U`, [slot.outFeatures, rank]);
    const vt = await this.tensorFromRange(header, `${parsed.path}.Vt`, [rank, slot.inFeatures]);
    return { key, path: parsed.path, rank, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, u, vt, bytes: u.byteLength + vt.byteLength };
  }

  /** The passthrough (non-LoRA) tensors stored with one adapter. */
  async loadPassthrough(id: string): Promise<PassthroughTensor[]> {
    const entry = this.adapter(id);
    if (!entry.file) return [];
    const file = await this.readVerified(entry.file);
    const out: PassthroughTensor[] = [];
    for (const info of file.tensors.values()) {
      if (!info.name.startsWith(PASSTHROUGH_PREFIX)) continue;
      const [begin, end] = info.dataOffsets;
      out.push({ name: info.name.slice(PASSTHROUGH_PREFIX.length), dtype: info.dtype, shape: info.shape, bytes: file.bytes.slice(file.dataStart + begin, file.dataStart + end) });
    }
    return out;
  }

  /** Checks every data file's size and sha256 and every adapter's tensors; returns the problems found. */
  async verifyFiles(): Promise<SoppuError[]> {
    const problems: SoppuError[] = [];
    const bases = new Set(this.manifest.basesFiles.filter((f): f is string => f !== null));
    for (const path of Object.keys(this.manifest.files)) {
      // bases files are checked streaming (they may pass 2 GiB); adapter files are small and read whole
      const check = bases.has(path) ? this.readVerifiedHeader(path) : this.readVerified(path);
      await check.catch((e: unknown) => problems.push(asBankError(e, join(this.dir, path))));
    }
    for (const id of this.ids()) {
      await this.loadAdapter(id).catch((e: unknown) => {
        if (!problems.some((p) => p.context.file === join(this.dir, this.adapter(id).file ?? ''))) problems.push(asBankError(e, this.dir));
      });
    }
    for (const slot of this.manifest.slots) {
      for (let c = 0; c < this.manifest.clusters; c++) {
        if (slot.ranks[c] === null) continue;
        await this.loadBases(basesKeyOf(c, slot.path)).catch((e: unknown) => {
          const file = join(this.dir, this.manifest.basesFiles[c] ?? '');
          if (!problems.some((p) => p.context.file === file)) problems.push(asBankError(e, file));
        });
      }
    }
    return problems;
  }

  private verifiedBasesHeader(relative: string): Promise<VerifiedHeader> {
    let pending = this.verifiedBases.get(relative);
    if (!pending) {
      pending = this.readVerifiedHeader(relative);
      pending.catch(() => this.verifiedBases.delete(relative));
      this.verifiedBases.set(relative, pending);
    }
    return pending;
  }

  /** Reads one tensor of an already verified (immutable, content-addressed) file by its byte range. */
  private async tensorFromRange(header: VerifiedHeader, name: string, shape: readonly number[]): Promise<Float32Array> {
    const info = this.checkInfo(header.path, header.tensors, name, shape);
    const [begin, end] = info.dataOffsets;
    const bytes = new Uint8Array(end - begin);
    let handle;
    try {
      handle = await open(header.path, 'r');
      let done = 0;
      while (done < bytes.length) {
        const { bytesRead } = await handle.read(bytes, done, bytes.length - done, header.dataStart + begin + done);
        if (bytesRead === 0) throw new Error('unexpected end of file');
        done += bytesRead;
      }
    } catch (e) {
      throw corrupt(header.path, `cannot read tensor "${name}" (${(e as Error).message})`, { tensor: name });
    } finally {
      await handle?.close();
    }
    return this.checkFinite(header.path, name, new Float32Array(bytes.buffer));
  }

  private checkInfo(path: string, tensors: ReadonlyMap<string, TensorInfo>, name: string, shape: readonly number[]): TensorInfo {
    const info = tensors.get(name);
    if (!info) throw corrupt(path, `tensor "${name}" is missing`, { tensor: name });
    if (info.dtype !== 'F32') throw corrupt(path, `tensor "${name}" is ${info.dtype}, expected F32`, { tensor: name, field: 'dtype' });
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw corrupt(path, `tensor "${name}" has shape [${info.shape.join(', ')}], the manifest implies [${shape.join(', ')}]`, { tensor: name, field: 'shape' });
    }
    return info;
  }

  private checkFinite(path: string, name: string, data: Float32Array): Float32Array {
    for (let i = 0; i < data.length; i++) {
      if (!Number.isFinite(data[i]!)) throw corrupt(path, `tensor "${name}" holds a non-finite value at element ${i}`, { tensor: name });
    }
    return data;
  }

  /**
   * A bases file verified without holding it: its size, its sha256 (streamed in 1 MiB reads) and its
   * header; tensors are then read by byte range. A bases file can pass 2 GiB, more than one read can hold.
   */
  private async readVerifiedHeader(relative: string): Promise<VerifiedHeader> {
    const path = join(this.dir, relative);
    const expected = this.manifest.files[relative];
    if (!expected) throw corrupt(join(this.dir, MANIFEST_NAME), `file "${relative}" is not listed in files`, { field: 'files' });
    let handle;
    try {
      handle = await open(path, 'r');
    } catch (e) {
      throw readFailure(path, e);
    }
    try {
      const size = (await handle.stat()).size;
      if (size !== expected.bytes) throw corrupt(path, `is ${size} bytes, the manifest records ${expected.bytes}`, { field: 'bytes', limit: expected.bytes });
      const readAt = async (into: Uint8Array, at: number): Promise<void> => {
        for (let done = 0; done < into.length; ) {
          const { bytesRead } = await handle.read(into, done, into.length - done, at + done);
          if (bytesRead === 0) throw corrupt(path, `ends at byte ${at + done}, the manifest records ${expected.bytes}`, { field: 'bytes' });
          done += bytesRead;
        }
      };
      const hash = createHash('sha256');
      const chunk = new Uint8Array(Math.min(1 << 20, Math.max(size, 1)));
      for (let at = 0; at < size; at += chunk.length) {
        const part = chunk.subarray(0, Math.min(chunk.length, size - at));
        await readAt(part, at);
        hash.update(part);
      }
      const sha256 = hash.digest('hex');
      if (sha256 !== expected.sha256) throw corrupt(path, `sha256 ${sha256} does not match the manifest's ${expected.sha256}`, { field: 'sha256' });
      if (size < 8) throw corrupt(path, 'too short for a safetensors file');
      const lengthBytes = new Uint8Array(8);
      await readAt(lengthBytes, 0);
      const headerLength = Number(new DataView(lengthBytes.buffer).getBigUint64(0, true));
      if (headerLength > size - 8) throw corrupt(path, `header length ${headerLength} runs past the end of the file`);
      const headerBytes = new Uint8Array(headerLength);
      await readAt(headerBytes, 8);
      let header;
      try {
        header = parseSafetensorsHeader(headerBytes, size - 8 - headerLength, path);
      } catch (e) {
        throw corrupt(path, e instanceof Error ? e.message : String(e));
      }
      return { path, tensors: new Map(header.tensors.map((t) => [t.name, t])), dataStart: 8 + headerLength };
    } catch (e) {
      if (e instanceof SoppuError) throw e;
      throw readFailure(path, e);
    } finally {
      await handle.close();
    }
  }

  private async readVerified(relative: string): Promise<VerifiedFile> {
    const path = join(this.dir, relative);
    const expected = this.manifest.files[relative];
    if (!expected) throw corrupt(join(this.dir, MANIFEST_NAME), `file "${relative}" is not listed in files`, { field: 'files' });
    let bytes: Uint8Array;
    try {
      const buffer = await readFile(path);
      // a plain Uint8Array view: Buffer#slice shares memory, and tensorDataFromBytes relies on slice copying
      bytes = new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    } catch (e) {
      throw readFailure(path, e);
    }
    if (bytes.length !== expected.bytes) throw corrupt(path, `is ${bytes.length} bytes, the manifest records ${expected.bytes}`, { field: 'bytes', limit: expected.bytes });
    const sha256 = sha256Hex(bytes);
    if (sha256 !== expected.sha256) throw corrupt(path, `sha256 ${sha256} does not match the manifest's ${expected.sha256}`, { field: 'sha256' });
    if (bytes.length < 8) throw corrupt(path, 'too short for a safetensors file');
    const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
    if (headerLength > bytes.length - 8) throw corrupt(path, `header length ${headerLength} runs past the end of the file`);
    let header;
    try {
      header = parseSafetensorsHeader(bytes.subarray(8, 8 + headerLength), bytes.length - 8 - headerLength, path);
    } catch (e) {
      throw corrupt(path, e instanceof Error ? e.message : String(e));
    }
    return { path, bytes, dataStart: 8 + headerLength, tensors: new Map(header.tensors.map((t) => [t.name, t])) };
  }

  private tensor(file: VerifiedFile, name: string, shape: readonly number[]): Float32Array {
    const info = this.checkInfo(file.path, file.tensors, name, shape);
    const [begin, end] = info.dataOffsets;
    return this.checkFinite(file.path, name, tensorDataFromBytes('F32', file.bytes.subarray(file.dataStart + begin, file.dataStart + end)) as Float32Array);
  }
}

/** A bank data file that cannot be read: missing, or the system's reason. */
function readFailure(path: string, e: unknown): SoppuError {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return corrupt(path, 'data file named by the manifest is missing', { field: 'files' });
  return corrupt(path, `cannot read the bank data file (${(e as Error).message})`, { cause: code });
}

function asBankError(e: unknown, file: string): SoppuError {
  if (e instanceof SoppuError) return e;
  return corrupt(file, e instanceof Error ? e.message : String(e));
}

/**
 * Opens the bank in `dir` and validates its manifest. Data files are checked (present, recorded size,
 * sha256) as they are loaded, so a missing or damaged file fails only the adapters (or, for a bases
 * file, the cluster) that read it; the rest serve, export and can be removed. verifyFiles() checks all.
 */
export async function openBank(dir: string): Promise<Bank> {
  return new Bank(dir, await readManifest(dir));
}

/** One slot of an adapter as dense-free factors: ΔW = B · A (scale folded into B). */
export interface ReconstructedSlot {
  readonly path: string;
  readonly storage: 'compressed' | 'raw';
  readonly rank: number;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** A: [rank, in] */
  readonly a: Float32Array;
  /** B: [out, rank] */
  readonly b: Float32Array;
}

/**
 * The bank's reconstruction of one adapter as LoRA factors: compressed slots become B = U·Σ, A = Vᵀ;
 * raw slots are as stored. Zero slots are omitted.
 */
export async function reconstructAdapter(bank: BankReader, id: string): Promise<Map<string, ReconstructedSlot>> {
  const parts = await bank.loadAdapter(id);
  const out = new Map<string, ReconstructedSlot>();
  for (const [path, part] of [...parts.slots].sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0))) {
    if (part.kind === 'raw') {
      out.set(path, { path, storage: 'raw', rank: part.rank, inFeatures: part.inFeatures, outFeatures: part.outFeatures, a: part.a, b: part.b });
      continue;
    }
    const bases = await bank.loadBases(part.basesKey);
    const rank = part.rank;
    // b = U · Σ: [out, rank]; U: [out, rank], Σ: [rank, rank] or diag
    const b = new Float32Array(bases.outFeatures * rank);
    for (let i = 0; i < bases.outFeatures; i++) {
      for (let k = 0; k < rank; k++) {
        if (part.diagonal) {
          b[i * rank + k] = bases.u[i * rank + k]! * part.core[k]!;
          continue;
        }
        let sum = 0;
        for (let j = 0; j < rank; j++) sum += bases.u[i * rank + j]! * part.core[j * rank + k]!;
        b[i * rank + k] = sum;
      }
    }
    out.set(path, { path, storage: 'compressed', rank, inFeatures: bases.inFeatures, outFeatures: bases.outFeatures, a: bases.vt.slice(), b });
  }
  return out;
}
