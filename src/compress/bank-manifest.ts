/**
 * The adapter bank's manifest (manifest.json): what the bank holds and where each part lives.
 * Layout of a bank directory (format version 1):
 *
 *   manifest.json                                   this file; replaced atomically (temp + fsync + rename)
 *   bases/cluster-<c>.<sha16>.safetensors           shared bases of cluster c: "<slot path>.U" [out,R], "<slot path>.Vt" [R,in]
 *   adapters/<safe id>.<sha16>.safetensors          one adapter: "<slot path>.core" ([R,R] or [R]), raw slots
 *                                                   "<slot path>.lora_A" [r,in] / ".lora_B" [out,r] (scale folded
 *                                                   into B), passthrough tensors "passthrough/<original name>"
 *
 * Data files are content-addressed (the name carries the first 16 hex digits of their sha256), so a
 * writer never overwrites a file the current manifest points at, and a new manifest only ever points
 * at files that were completely written first. The manifest records every data file's sha256 and size.
 * Writers hold `.lock` (pid and a token inside; a dead writer's lock is taken over: bank-lock.ts); after switching the manifest
 * they delete files neither the new nor the previous manifest references (one generation of grace for
 * readers that opened the previous one). Each adapter records its source directory and the sha256 of
 * its adapter_model.safetensors, so `bank refit` can tell whether the source is still the original.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { CompressOptions, JdMethod } from './compression-types.js';

export const BANK_FORMAT = 'soppu-bank';
export const BANK_FORMAT_VERSION = 1;
export const MANIFEST_NAME = 'manifest.json';
/** Tensor-name prefix of passthrough (non-LoRA) tensors inside an adapter file. */
export const PASSTHROUGH_PREFIX = 'passthrough/';

export type SlotStorage = 'compressed' | 'raw' | 'zero';
export type RawReason = 'cheaper-raw' | 'over-budget' | 'projection-over-budget';

export interface ManifestErrorByRank {
  readonly cluster: number;
  readonly rank: number;
  readonly maxError: number;
  readonly meanError: number;
}

export interface ManifestSlot {
  /** Canonical module path, e.g. "model.layers.3.self_attn.q_proj". */
  readonly path: string;
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly method: JdMethod;
  /** Shared rank per cluster; null where the cluster has no bases for this slot. */
  readonly ranks: readonly (number | null)[];
  readonly sweeps: number;
  readonly errorByRank?: readonly ManifestErrorByRank[];
}

export interface ManifestAdapterSlot {
  readonly storage: SlotStorage;
  /** ‖ΔW − reconstruction‖_F / ‖ΔW‖_F, vs the source adapter (or an upper bound, see errorBasis). */
  readonly relativeError: number;
  /** Rank as stored: the cluster's shared rank (compressed) or the LoRA rank (raw). */
  readonly rank?: number;
  readonly reason?: RawReason;
  /** The source adapter's LoRA rank r for this slot (for parameter counts). */
  readonly sourceRank?: number;
}

export interface ManifestAdapter {
  readonly id: string;
  readonly source: string;
  readonly cluster: number;
  readonly baseModel: string | null;
  readonly sourceDtype: string;
  readonly flags: readonly string[];
  readonly rawParameters: number;
  /** How the adapter entered the bank. */
  readonly addedBy: 'compress' | 'add' | 'refit';
  /** 'source': errors measured against the original adapter; 'bound': after a refit from the bank's
   * own reconstruction, previous error + refit error (an upper bound by the triangle inequality). */
  readonly errorBasis: 'source' | 'bound';
  /** sha256 of the source's adapter_model.safetensors when it was read (a refit reloads an unchanged source). */
  readonly sourceSha256?: string;
  /** The error budget the adapter was stored under, where it is not the bank's options.maxError (a `bank add --max-error`). */
  readonly maxError?: number;
  readonly perSlot: Readonly<Record<string, ManifestAdapterSlot>>;
  /** Relative path of this adapter's data file; null when nothing is stored (all slots zero). */
  readonly file: string | null;
  /** The source adapter_config.json (kept so an export can carry modules_to_save, task_type, …). */
  readonly config: Readonly<Record<string, unknown>> | null;
}

export interface ManifestFile {
  readonly sha256: string;
  readonly bytes: number;
}

export interface BankManifest {
  readonly format: typeof BANK_FORMAT;
  readonly formatVersion: number;
  /** Incremented by every change; the manifest's own generation. */
  readonly generation: number;
  readonly createdAt: string;
  readonly updatedAt: string;
  readonly baseModel: string | null;
  readonly method: JdMethod;
  readonly clusters: number;
  /** The options the bank was fitted with (a refit reuses them). */
  readonly options: Omit<CompressOptions, 'onProgress'>;
  /** Sorted by path. */
  readonly slots: readonly ManifestSlot[];
  /** Sorted by id. */
  readonly adapters: readonly ManifestAdapter[];
  /** Bases file per cluster (null when the cluster has no bases at all). */
  readonly basesFiles: readonly (string | null)[];
  readonly refitAdvised: boolean;
  readonly refitReasons: readonly string[];
  /** Every data file the manifest references: relative path → checksum and size. */
  readonly files: Readonly<Record<string, ManifestFile>>;
}

/**
 * Key naming one cluster × slot pair of shared bases (BankSlotPart.basesKey). With `basesFile` (the cluster's
 * content-addressed bases file) the key names that version of them: a cache keyed by it never hands a refit's
 * cores the bases they were not fitted with.
 */
export function basesKeyOf(cluster: number, path: string, basesFile?: string | null): string {
  return basesFile ? `${cluster}/${path}@${basesFile}` : `${cluster}/${path}`;
}

/** Inverse of basesKeyOf; null when malformed. */
export function parseBasesKey(key: string): { cluster: number; path: string; basesFile: string | null } | null {
  const at = key.indexOf('@');
  const name = at < 0 ? key : key.slice(0, at);
  const slash = name.indexOf('/');
  if (slash <= 0) return null;
  const cluster = Number(name.slice(0, slash));
  if (!Number.isInteger(cluster) || cluster < 0) return null;
  return { cluster, path: name.slice(slash + 1), basesFile: at < 0 ? null : key.slice(at + 1) };
}

const MAX_ID_LENGTH = 256;

/** The prefix of the ids the engine gives adapters that requests name by directory; no bank id has it. */
export const LOCAL_ADAPTER_PREFIX = '@local:';

/** Checks an adapter id (used in the API's adapter_id field and in file names after sanitising). */
export function checkAdapterId(id: string, field = 'id'): void {
  if (id.length === 0) throw new SoppuError('CONFIG', `adapter ${field} is empty`, { field });
  if (id.length > MAX_ID_LENGTH) throw new SoppuError('CONFIG', `adapter ${field} ${JSON.stringify(id.slice(0, 40))}… is ${id.length} characters (limit ${MAX_ID_LENGTH})`, { field, limit: MAX_ID_LENGTH });
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(id)) throw new SoppuError('CONFIG', `adapter ${field} ${JSON.stringify(id)} contains control characters`, { field });
  if (id.startsWith(LOCAL_ADAPTER_PREFIX)) {
    throw new SoppuError('CONFIG', `adapter ${field} ${JSON.stringify(id)} starts with ${LOCAL_ADAPTER_PREFIX}, which names adapters served from a directory`, { field });
  }
}

/** A file-name-safe rendering of an id (uniqueness comes from the content hash beside it). */
export function safeFileStem(id: string): string {
  const stem = id.replace(/[^A-Za-z0-9._-]/g, '_').replace(/^\.+/, '_').slice(0, 80);
  return stem.length > 0 ? stem : '_';
}

// ---------------------------------------------------------------- validation

function corrupt(file: string, field: string, message: string): SoppuError {
  return new SoppuError('BANK_CORRUPT', `${file}: ${field}: ${message}`, { file, field });
}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

class Checker {
  constructor(readonly file: string) {}
  object(v: unknown, field: string): Json {
    if (!isObject(v)) throw corrupt(this.file, field, 'must be an object');
    return v;
  }
  array(v: unknown, field: string): unknown[] {
    if (!Array.isArray(v)) throw corrupt(this.file, field, 'must be an array');
    return v;
  }
  string(v: unknown, field: string): string {
    if (typeof v !== 'string') throw corrupt(this.file, field, 'must be a string');
    return v;
  }
  nullableString(v: unknown, field: string): string | null {
    if (v === null || v === undefined) return null;
    return this.string(v, field);
  }
  integer(v: unknown, field: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw corrupt(this.file, field, `must be an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
    return v;
  }
  finite(v: unknown, field: string, min = -Infinity): number {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min) throw corrupt(this.file, field, `must be a finite number ≥ ${min}, got ${JSON.stringify(v)}`);
    return v;
  }
  oneOf<T extends string>(v: unknown, field: string, values: readonly T[]): T {
    if (typeof v !== 'string' || !(values as readonly string[]).includes(v)) throw corrupt(this.file, field, `must be one of ${values.join(', ')}, got ${JSON.stringify(v)}`);
    return v as T;
  }
}

const METHODS: readonly JdMethod[] = ['jd-full', 'jd-diag'];
const STORAGES: readonly SlotStorage[] = ['compressed', 'raw', 'zero'];
const REASONS: readonly RawReason[] = ['cheaper-raw', 'over-budget', 'projection-over-budget'];
const MAX_DIM = 1 << 20;

/**
 * The options the bank was compressed with (bank add and refit compress by them): each one given
 * checked as the compressor checks it, so a bad value is an error naming options.<field>, not a
 * budget silently compared against text or a CONFIG error that names no file.
 */
function checkOptions(c: Checker, value: unknown): Omit<CompressOptions, 'onProgress'> {
  const o = c.object(value, 'options');
  const given = <T>(key: string, check: (v: unknown, field: string) => T): T | undefined => (o[key] === undefined ? undefined : check(o[key], `options.${key}`));
  given('method', (v, f) => c.oneOf(v, f, METHODS));
  given('rank', (v, f) => c.integer(v, f, 1, MAX_DIM));
  given('maxError', (v, f) => {
    const x = c.finite(v, f, 0);
    if (!(x > 0 && x <= 1)) throw corrupt(c.file, f, `must be in (0, 1], got ${x}`);
    return x;
  });
  given('clusters', (v, f) => c.integer(v, f, 1, 1 << 16));
  given('weighting', (v, f) => c.oneOf(v, f, ['unit-norm', 'none'] as const));
  given('tolerance', (v, f) => c.finite(v, f, 0));
  given('maxSweeps', (v, f) => c.integer(v, f, 1));
  given('seed', (v, f) => c.integer(v, f, Number.MIN_SAFE_INTEGER));
  return o as Omit<CompressOptions, 'onProgress'>;
}

/**
 * Parses and validates manifest JSON text: schema, version, cross-references (every adapter's slots
 * exist, compressed slots have bases in the adapter's cluster, every referenced file is listed).
 * Throws SoppuError(BANK_CORRUPT) naming the file and the field.
 */
export function parseManifest(text: string, file: string): BankManifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new SoppuError('BANK_CORRUPT', `${file}: not valid JSON (${e instanceof Error ? e.message : String(e)})`, { file }, { cause: e });
  }
  const c = new Checker(file);
  const root = c.object(raw, 'manifest');
  if (root.format !== BANK_FORMAT) throw corrupt(file, 'format', `must be "${BANK_FORMAT}", got ${JSON.stringify(root.format)}`);
  const formatVersion = c.integer(root.formatVersion, 'formatVersion', 1);
  if (formatVersion > BANK_FORMAT_VERSION) {
    throw corrupt(file, 'formatVersion', `version ${formatVersion} is newer than this SOPPU reads (limit ${BANK_FORMAT_VERSION}); upgrade SOPPU`);
  }
  const generation = c.integer(root.generation, 'generation', 1);
  const method = c.oneOf(root.method, 'method', METHODS);
  const clusters = c.integer(root.clusters, 'clusters', 1, 1 << 16);
  const options = checkOptions(c, root.options);

  const files: Record<string, ManifestFile> = {};
  const filesObject = c.object(root.files, 'files');
  for (const [name, entry] of Object.entries(filesObject)) {
    if (name.startsWith('/') || name.split('/').includes('..') || name.includes('\\')) throw corrupt(file, `files["${name}"]`, 'path must be relative and stay inside the bank');
    const e = c.object(entry, `files["${name}"]`);
    const sha256 = c.string(e.sha256, `files["${name}"].sha256`);
    if (!/^[0-9a-f]{64}$/.test(sha256)) throw corrupt(file, `files["${name}"].sha256`, 'must be 64 lowercase hex digits');
    files[name] = { sha256, bytes: c.integer(e.bytes, `files["${name}"].bytes`, 0) };
  }
  const checkFileRef = (ref: string | null, field: string): string | null => {
    if (ref !== null && !(ref in files)) throw corrupt(file, field, `names file "${ref}" that is not listed in files`);
    return ref;
  };

  const basesFilesRaw = c.array(root.basesFiles, 'basesFiles');
  if (basesFilesRaw.length !== clusters) throw corrupt(file, 'basesFiles', `has ${basesFilesRaw.length} entries, clusters is ${clusters}`);
  const basesFiles = basesFilesRaw.map((v, i) => checkFileRef(c.nullableString(v, `basesFiles[${i}]`), `basesFiles[${i}]`));

  const slots: ManifestSlot[] = [];
  const slotByPath = new Map<string, ManifestSlot>();
  c.array(root.slots, 'slots').forEach((v, i) => {
    const field = `slots[${i}]`;
    const s = c.object(v, field);
    const path = c.string(s.path, `${field}.path`);
    if (slotByPath.has(path)) throw corrupt(file, `${field}.path`, `slot "${path}" is listed twice`);
    const ranksRaw = c.array(s.ranks, `${field}.ranks`);
    if (ranksRaw.length !== clusters) throw corrupt(file, `${field}.ranks`, `has ${ranksRaw.length} entries, clusters is ${clusters}`);
    const inFeatures = c.integer(s.inFeatures, `${field}.inFeatures`, 1, MAX_DIM);
    const outFeatures = c.integer(s.outFeatures, `${field}.outFeatures`, 1, MAX_DIM);
    const ranks = ranksRaw.map((r, k) => {
      if (r === null) return null;
      const rank = c.integer(r, `${field}.ranks[${k}]`, 1, Math.min(inFeatures, outFeatures));
      if (basesFiles[k] === null) throw corrupt(file, `${field}.ranks[${k}]`, `cluster ${k} has a rank but no bases file`);
      return rank;
    });
    let errorByRank: ManifestErrorByRank[] | undefined;
    if (s.errorByRank !== undefined) {
      errorByRank = c.array(s.errorByRank, `${field}.errorByRank`).map((p, k) => {
        const q = c.object(p, `${field}.errorByRank[${k}]`);
        return {
          cluster: c.integer(q.cluster, `${field}.errorByRank[${k}].cluster`, 0, clusters - 1),
          rank: c.integer(q.rank, `${field}.errorByRank[${k}].rank`, 1),
          maxError: c.finite(q.maxError, `${field}.errorByRank[${k}].maxError`, 0),
          meanError: c.finite(q.meanError, `${field}.errorByRank[${k}].meanError`, 0),
        };
      });
    }
    const slot: ManifestSlot = {
      path, inFeatures, outFeatures, ranks,
      method: c.oneOf(s.method, `${field}.method`, METHODS),
      sweeps: c.integer(s.sweeps, `${field}.sweeps`, 0),
      ...(errorByRank ? { errorByRank } : {}),
    };
    slots.push(slot);
    slotByPath.set(path, slot);
  });

  const adapters: ManifestAdapter[] = [];
  const ids = new Set<string>();
  c.array(root.adapters, 'adapters').forEach((v, i) => {
    const a = c.object(v, `adapters[${i}]`);
    const id = c.string(a.id, `adapters[${i}].id`);
    const field = `adapters["${id}"]`;
    if (ids.has(id)) throw corrupt(file, field, `id "${id}" is listed twice`);
    ids.add(id);
    const cluster = c.integer(a.cluster, `${field}.cluster`, 0, clusters - 1);
    const perSlot: Record<string, ManifestAdapterSlot> = {};
    for (const [path, entry] of Object.entries(c.object(a.perSlot, `${field}.perSlot`))) {
      const sf = `${field}.perSlot["${path}"]`;
      const slot = slotByPath.get(path);
      if (!slot) throw corrupt(file, sf, `slot "${path}" is not in slots`);
      const e = c.object(entry, sf);
      const storage = c.oneOf(e.storage, `${sf}.storage`, STORAGES);
      const relativeError = c.finite(e.relativeError, `${sf}.relativeError`, 0);
      let rank: number | undefined;
      // a raw slot keeps its adapter's rank, which PEFT lets exceed the layer's dimensions
      if (storage !== 'zero') rank = c.integer(e.rank, `${sf}.rank`, 1, storage === 'raw' ? MAX_DIM : Math.max(slot.inFeatures, slot.outFeatures));
      if (storage === 'compressed' && slot.ranks[cluster] !== rank) {
        throw corrupt(file, `${sf}.rank`, `is ${rank} but cluster ${cluster} of slot "${path}" has shared rank ${slot.ranks[cluster]}`);
      }
      const reason = storage === 'raw' ? c.oneOf(e.reason, `${sf}.reason`, REASONS) : undefined;
      const sourceRank = e.sourceRank === undefined ? undefined : c.integer(e.sourceRank, `${sf}.sourceRank`, 1);
      perSlot[path] = { storage, relativeError, ...(rank !== undefined ? { rank } : {}), ...(reason ? { reason } : {}), ...(sourceRank !== undefined ? { sourceRank } : {}) };
    }
    const fileRef = checkFileRef(c.nullableString(a.file, `${field}.file`), `${field}.file`);
    const stored = Object.values(perSlot).some((p) => p.storage !== 'zero');
    if (stored && fileRef === null) throw corrupt(file, `${field}.file`, 'is null but the adapter has stored slots');
    adapters.push({
      id, cluster, perSlot,
      source: c.string(a.source, `${field}.source`),
      baseModel: c.nullableString(a.baseModel, `${field}.baseModel`),
      sourceDtype: c.string(a.sourceDtype, `${field}.sourceDtype`),
      flags: c.array(a.flags, `${field}.flags`).map((f, k) => c.string(f, `${field}.flags[${k}]`)),
      rawParameters: c.integer(a.rawParameters, `${field}.rawParameters`, 0),
      addedBy: c.oneOf(a.addedBy, `${field}.addedBy`, ['compress', 'add', 'refit'] as const),
      errorBasis: c.oneOf(a.errorBasis, `${field}.errorBasis`, ['source', 'bound'] as const),
      ...(a.sourceSha256 !== undefined ? { sourceSha256: c.string(a.sourceSha256, `${field}.sourceSha256`) } : {}),
      ...(a.maxError !== undefined ? { maxError: c.finite(a.maxError, `${field}.maxError`, 0) } : {}),
      file: fileRef,
      config: a.config === null || a.config === undefined ? null : c.object(a.config, `${field}.config`),
    });
  });

  return {
    format: BANK_FORMAT,
    formatVersion,
    generation,
    createdAt: c.string(root.createdAt, 'createdAt'),
    updatedAt: c.string(root.updatedAt, 'updatedAt'),
    baseModel: c.nullableString(root.baseModel, 'baseModel'),
    method,
    clusters,
    options,
    slots,
    adapters,
    basesFiles,
    refitAdvised: root.refitAdvised === true,
    refitReasons: c.array(root.refitReasons, 'refitReasons').map((r, k) => c.string(r, `refitReasons[${k}]`)),
    files,
  };
}

/** Deterministic JSON text of a manifest (sorted adapters and slots, 2-space indent). */
export function serializeManifest(manifest: BankManifest): string {
  const sorted: BankManifest = {
    ...manifest,
    slots: [...manifest.slots].sort((x, y) => compareStrings(x.path, y.path)),
    adapters: [...manifest.adapters].sort((x, y) => compareStrings(x.id, y.id)),
    files: Object.fromEntries(Object.entries(manifest.files).sort(([x], [y]) => compareStrings(x, y))),
  };
  return `${JSON.stringify(sorted, null, 2)}\n`;
}

export function compareStrings(x: string, y: string): number {
  return x < y ? -1 : x > y ? 1 : 0;
}
