/**
 * Writes adapter banks (format in bank-manifest.ts). Every change follows one order, so a crash at
 * any point leaves the previous or the new bank, never a broken one:
 *   1. take the bank's lock (bank-lock.ts: a writer killed with SIGKILL leaves its lock file; the next
 *      writer sees the pid is dead and takes it over);
 *   2. write new data files, each atomically (temp + fsync + rename), under content-addressed names no
 *      current file has;
 *   3. write manifest.json atomically (temp + fsync + rename + directory fsync): the switch;
 *   4. delete data files that neither the new nor the previous manifest references (one generation of
 *      grace for servers that opened the previous one), and leftover temp files.
 */
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, stat, unlink } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import { withBankLock } from './bank-lock.js';
import { safetensorsToBytes, tensorDataFromBytes, writeFileAtomic } from '../io/safetensors.js';
import type { TensorToWrite } from '../io/safetensors-types.js';
import type { PassthroughTensor } from '../io/lora-types.js';
import {
  BANK_FORMAT, BANK_FORMAT_VERSION, MANIFEST_NAME, PASSTHROUGH_PREFIX, parseManifest, safeFileStem, serializeManifest,
  type BankManifest, type ManifestAdapter, type ManifestAdapterSlot, type ManifestFile, type ManifestSlot,
} from './bank-manifest.js';
import type { AdapterSlotResult, CompressionResult, SlotResult } from './compression-types.js';

/** What a bank stores per adapter beyond the compression result. */
export interface AdapterExtras {
  readonly passthrough: readonly PassthroughTensor[];
  /** The source adapter_config.json, for exports. */
  readonly config: Readonly<Record<string, unknown>> | null;
  /** LoRA rank r of each of the source's slots (recorded for parameter counts). */
  readonly sourceRanks?: ReadonlyMap<string, number>;
}

export interface WrittenFile {
  readonly path: string;
  readonly entry: ManifestFile;
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/** sha256 of `<dir>/adapter_model.safetensors`, or null when there is no such file (in-memory adapters). */
export async function sourceWeightsSha256(dir: string): Promise<string | null> {
  if (!dir) return null;
  try {
    return sha256Hex(await readFile(join(dir, 'adapter_model.safetensors')));
  } catch {
    return null;
  }
}

/** Writes one content-addressed safetensors file under `dir/subdir` (skipped when already present and intact). */
export async function writeDataFile(dir: string, subdir: string, stem: string, tensors: readonly TensorToWrite[], metadata: Record<string, string>): Promise<WrittenFile> {
  const bytes = safetensorsToBytes(tensors, metadata);
  const sha256 = sha256Hex(bytes);
  const relative = `${subdir}/${safeFileStem(stem)}.${sha256.slice(0, 16)}.safetensors`;
  const full = join(dir, relative);
  await mkdir(join(dir, subdir), { recursive: true });
  const existing = await stat(full).catch(() => null);
  if (!existing || existing.size !== bytes.length || sha256Hex(await readFile(full)) !== sha256) {
    await writeFileAtomic(full, [bytes]);
  }
  return { path: relative, entry: { sha256, bytes: bytes.length } };
}

function passthroughTensor(t: PassthroughTensor): TensorToWrite {
  return { name: `${PASSTHROUGH_PREFIX}${t.name}`, dtype: t.dtype, shape: t.shape, data: tensorDataFromBytes(t.dtype, t.bytes) };
}

/** Tensors of one adapter's file: cores, raw factors (scale folded into B), passthrough tensors. */
export function adapterTensors(slots: ReadonlyMap<string, { readonly slot: AdapterSlotResult; readonly inFeatures: number; readonly outFeatures: number; readonly rank: number | null; readonly diagonal: boolean }>, passthrough: readonly PassthroughTensor[]): TensorToWrite[] {
  const tensors: TensorToWrite[] = [];
  for (const [path, { slot, inFeatures, outFeatures, rank, diagonal }] of slots) {
    if (slot.storage === 'compressed') {
      if (rank === null) throw new SoppuError('INTERNAL', `slot ${path}: compressed core without a cluster rank`, { tensor: path });
      tensors.push({ name: `${path}.core`, dtype: 'F32', shape: diagonal ? [rank] : [rank, rank], data: slot.core });
    } else if (slot.storage === 'raw') {
      tensors.push({ name: `${path}.lora_A`, dtype: 'F32', shape: [slot.rank, inFeatures], data: slot.a });
      tensors.push({ name: `${path}.lora_B`, dtype: 'F32', shape: [outFeatures, slot.rank], data: slot.b });
    }
  }
  for (const t of passthrough) tensors.push(passthroughTensor(t));
  return tensors;
}

/** Writes one adapter's data file; null when there is nothing to store. */
export async function writeAdapterFile(dir: string, id: string, tensors: readonly TensorToWrite[]): Promise<WrittenFile | null> {
  if (tensors.length === 0) return null;
  return writeDataFile(dir, 'adapters', id, tensors, { format: BANK_FORMAT, kind: 'adapter', id });
}

/** Writes cluster c's bases file (every slot with bases in c); null when the cluster has none. */
export async function writeBasesFile(dir: string, cluster: number, slots: readonly SlotResult[]): Promise<WrittenFile | null> {
  const tensors: TensorToWrite[] = [];
  for (const slot of slots) {
    const bases = slot.bases[cluster];
    if (!bases) continue;
    tensors.push({ name: `${slot.path}.U`, dtype: 'F32', shape: [slot.outFeatures, bases.rank], data: bases.u });
    tensors.push({ name: `${slot.path}.Vt`, dtype: 'F32', shape: [bases.rank, slot.inFeatures], data: bases.vt });
  }
  if (tensors.length === 0) return null;
  return writeDataFile(dir, 'bases', `cluster-${cluster}`, tensors, { format: BANK_FORMAT, kind: 'bases', cluster: String(cluster) });
}

/** Manifest entry of one adapter slot result. */
export function manifestSlotEntry(slot: AdapterSlotResult, clusterRank: number | null): ManifestAdapterSlot {
  switch (slot.storage) {
    case 'compressed': return { storage: 'compressed', relativeError: slot.relativeError, rank: clusterRank ?? 0 };
    case 'raw': return { storage: 'raw', relativeError: 0, rank: slot.rank, reason: slot.reason };
    case 'zero': return { storage: 'zero', relativeError: 0 };
  }
}

export function manifestSlotsOf(result: CompressionResult): ManifestSlot[] {
  return result.slots.map((s) => ({
    path: s.path,
    inFeatures: s.inFeatures,
    outFeatures: s.outFeatures,
    method: s.method,
    ranks: Array.from({ length: result.clusters }, (_, c) => s.bases[c]?.rank ?? null),
    sweeps: s.sweeps,
    ...(s.errorByRank ? { errorByRank: s.errorByRank.map((p) => ({ ...p })) } : {}),
  }));
}

/** Why a refit would help, judged from the per-slot storage of every adapter. */
export function refitReasonsOf(adapters: readonly ManifestAdapter[]): string[] {
  const reasons: string[] = [];
  for (const a of adapters) {
    const over = Object.entries(a.perSlot).filter(([, p]) => p.reason === 'projection-over-budget').map(([path]) => path);
    if (over.length > 0) reasons.push(`adapter ${a.id}: projection onto the bank's bases missed the error budget in ${over.length} slot(s) (e.g. ${over[0]}); kept raw`);
  }
  return reasons;
}

export interface WriteBankOptions {
  /** Replace an existing bank in `dir` (its old files are collected after the switch). */
  readonly replace?: boolean;
  /** How the adapters entered the bank (recorded per adapter). */
  readonly addedBy?: 'compress' | 'refit';
  /** Per adapter: errors are measured against the source ('source'), or are bounds (refit from reconstruction). */
  readonly errorBasis?: ReadonlyMap<string, 'source' | 'bound'>;
  /** Errors to add per adapter and slot (a refit from reconstruction adds the previous error). */
  readonly previousErrors?: ReadonlyMap<string, Readonly<Record<string, number>>>;
  /** Recorded source checksums to keep per adapter (refit from the bank must not re-hash a changed source). */
  readonly sourceSha256?: ReadonlyMap<string, string | null>;
  /** The bank's base model (a refit keeps the one the bank has); default: the name most adapters give. */
  readonly baseModel?: string | null;
  /** Called with (done, total, label) as files are written. */
  readonly onProgress?: (done: number, total: number, label: string) => void;
}

/**
 * Writes a whole bank from a compression result: bases per cluster, one file per adapter, then the
 * manifest. Refuses a directory that already holds a bank unless `replace`.
 */
export async function writeBank(dir: string, result: CompressionResult, extras: ReadonlyMap<string, AdapterExtras>, options: WriteBankOptions = {}): Promise<BankManifest> {
  return withBankLock(dir, () => writeBankLocked(dir, result, extras, options), { create: true });
}

/**
 * Checks, before any work, that a new bank can be written at `dir`: it is a folder (or can be made
 * one) and holds no bank unless `replace`. writeBank checks again under the lock.
 */
export async function checkNewBankOutput(dir: string, replace: boolean): Promise<void> {
  const info = await stat(dir).catch(() => null);
  if (info && !info.isDirectory()) throw new SoppuError('FILE_IO', `${dir}: is a file, not a bank folder`, { file: dir });
  const manifestText = info ? await readManifestText(dir) : null;
  if (manifestText !== null && !replace) {
    throw new SoppuError('BANK_CONFLICT', `${join(dir, MANIFEST_NAME)}: a bank already exists here; use \`soppu bank add\` to add adapters or --force to replace it`, { file: join(dir, MANIFEST_NAME) });
  }
  if (info && manifestText === null) {
    // no bank here: a folder that holds anything a bank writer did not make is refused, --force or not (the bank's
    // garbage collection deletes the data-like files no manifest lists: a user's own adapters/x.safetensors)
    const foreign = await foreignEntries(dir);
    if (foreign.length > 0) {
      const shown = foreign.slice(0, 3).join(', ') + (foreign.length > 3 ? ', …' : '');
      throw new SoppuError('CONFIG', `${dir} already holds files that are not a bank's (${shown}); choose a new or empty folder`, { file: dir, field: 'output' });
    }
  }
  if (!info) {
    // the nearest existing parent must be a folder: `-o model/config.json/bank` fails now, not after compressing
    let parent = dirname(resolve(dir));
    for (;;) {
      const found = await stat(parent).catch(() => null);
      if (found) {
        if (!found.isDirectory()) throw new SoppuError('FILE_IO', `${dir}: cannot create the bank folder (${parent} is a file)`, { file: dir });
        break;
      }
      if (dirname(parent) === parent) break;
      parent = dirname(parent);
    }
  }
}

/** A temp file of an interrupted write (writeFileAtomic's name). */
const TEMP_FILE = /^\..*\.tmp-\d+-[0-9a-f]+$/;
/** A data file as the writer names them: `<stem>.<16 hex of its sha256>.safetensors`. */
const DATA_FILE = /^[^/]+\.[0-9a-f]{16}\.safetensors$/;

/** The entries of a folder without a manifest that no bank writer makes (its lock, temp and data files). */
async function foreignEntries(dir: string): Promise<string[]> {
  const foreign: string[] = [];
  for (const name of await readdir(dir)) {
    if (name === '.lock' || TEMP_FILE.test(name)) continue;
    if (name === 'adapters' || name === 'bases') {
      const inner = await readdir(join(dir, name)).catch(() => null);
      if (inner === null) foreign.push(name);
      else foreign.push(...inner.filter((file) => !TEMP_FILE.test(file) && !DATA_FILE.test(file)).map((file) => `${name}/${file}`));
      continue;
    }
    foreign.push(name);
  }
  return foreign;
}

/** writeBank for a caller that already holds the bank lock (refit). */
export async function writeBankLocked(dir: string, result: CompressionResult, extras: ReadonlyMap<string, AdapterExtras>, options: WriteBankOptions = {}): Promise<BankManifest> {
  {
    const previous = await readManifestText(dir);
    if (previous !== null && !options.replace) {
      throw new SoppuError('BANK_CONFLICT', `${join(dir, MANIFEST_NAME)}: a bank already exists here; use \`soppu bank add\` to add adapters or --force to replace it`, { file: join(dir, MANIFEST_NAME) });
    }
    const previousGeneration = previous !== null ? previousGenerationOf(previous) : 0;
    let previousManifest: BankManifest | null = null;
    try {
      previousManifest = previous !== null ? parseManifest(previous, join(dir, MANIFEST_NAME)) : null;
    } catch {
      previousManifest = null; // an unreadable old manifest protects nothing
    }
    const files: Record<string, ManifestFile> = {};
    const total = result.clusters + result.adapters.length;
    let done = 0;
    const basesFiles: (string | null)[] = [];
    for (let c = 0; c < result.clusters; c++) {
      const written = await writeBasesFile(dir, c, result.slots);
      if (written) files[written.path] = written.entry;
      basesFiles.push(written?.path ?? null);
      options.onProgress?.(++done, total, `bases of cluster ${c}`);
    }
    const slotEntries = manifestSlotsOf(result);
    const slotByPath = new Map(result.slots.map((s, i) => [s.path, { result: s, entry: slotEntries[i]! }]));
    const adapters: ManifestAdapter[] = [];
    for (const info of result.adapters) {
      const perSlotResults = new Map<string, { slot: AdapterSlotResult; inFeatures: number; outFeatures: number; rank: number | null; diagonal: boolean }>();
      const perSlot: Record<string, ManifestAdapterSlot> = {};
      const previousErrors = options.previousErrors?.get(info.id);
      for (const [path, { result: slot, entry }] of slotByPath) {
        const adapterSlot = slot.adapters.get(info.id);
        if (!adapterSlot) continue;
        const rank = entry.ranks[info.cluster] ?? null;
        perSlotResults.set(path, { slot: adapterSlot, inFeatures: slot.inFeatures, outFeatures: slot.outFeatures, rank, diagonal: slot.method === 'jd-diag' });
        const manifestEntry = manifestSlotEntry(adapterSlot, rank);
        const added = previousErrors?.[path] ?? 0;
        const sourceRank = extras.get(info.id)?.sourceRanks?.get(path);
        perSlot[path] = { ...manifestEntry, ...(added > 0 ? { relativeError: manifestEntry.relativeError + added } : {}), ...(sourceRank !== undefined ? { sourceRank } : {}) };
      }
      const extra = extras.get(info.id);
      const sourceSha256 = options.sourceSha256?.has(info.id) ? options.sourceSha256.get(info.id)! : await sourceWeightsSha256(info.source);
      const written = await writeAdapterFile(dir, info.id, adapterTensors(perSlotResults, extra?.passthrough ?? []));
      if (written) files[written.path] = written.entry;
      adapters.push({
        id: info.id,
        source: info.source,
        cluster: info.cluster,
        baseModel: info.baseModel,
        sourceDtype: info.sourceDtype,
        flags: [...info.flags],
        rawParameters: info.rawParameters,
        addedBy: options.addedBy ?? 'compress',
        errorBasis: options.errorBasis?.get(info.id) ?? 'source',
        ...(sourceSha256 !== null ? { sourceSha256 } : {}),
        perSlot,
        file: written?.path ?? null,
        config: extra?.config ?? null,
      });
      options.onProgress?.(++done, total, info.id);
    }
    const now = new Date().toISOString();
    // the name most of the adapters give (the first such in the result's order on a tie; compress orders by id): with
    // --ignore-base-model a bank holds adapters that name one model otherwise, and a null here would have let any
    // later add in unchecked. A refit passes the bank's own (a majority of flagged adds must not take it over).
    const nameCounts = new Map<string, number>();
    for (const a of result.adapters) if (a.baseModel !== null) nameCounts.set(a.baseModel, (nameCounts.get(a.baseModel) ?? 0) + 1);
    const majority = [...nameCounts.entries()].reduce<[string, number] | null>((best, entry) => (best === null || entry[1] > best[1] ? entry : best), null)?.[0] ?? null;
    const baseModel = options.baseModel !== undefined ? options.baseModel : majority;
    const reasons = refitReasonsOf(adapters);
    const manifest: BankManifest = {
      format: BANK_FORMAT,
      formatVersion: BANK_FORMAT_VERSION,
      generation: previousGeneration + 1,
      createdAt: now,
      updatedAt: now,
      baseModel,
      method: result.method,
      clusters: result.clusters,
      options: result.options,
      slots: slotEntries,
      adapters,
      basesFiles,
      refitAdvised: reasons.length > 0,
      refitReasons: reasons,
      files,
    };
    await commitManifest(dir, manifest, previousManifest);
    return manifest;
  }
}

async function readManifestText(dir: string): Promise<string | null> {
  try {
    return await readFile(join(dir, MANIFEST_NAME), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new SoppuError('FILE_IO', `${join(dir, MANIFEST_NAME)}: cannot read (${(e as Error).message})`, { file: join(dir, MANIFEST_NAME) }, { cause: e });
  }
}

function previousGenerationOf(text: string): number {
  try {
    const g = (JSON.parse(text) as { generation?: unknown }).generation;
    return typeof g === 'number' && Number.isInteger(g) && g > 0 ? g : 0;
  } catch {
    return 0;
  }
}

/**
 * Switches the bank to `manifest` (atomic replace of manifest.json), then deletes every data file and
 * temp file that neither it nor the `previous` manifest references. Files of the previous generation
 * are kept one generation longer, so a server that opened the bank before the switch can still load
 * from it until it reopens; so are the files of `keep` (older manifests a server still reads from). Call with
 * the bank lock held.
 */
export async function commitManifest(dir: string, manifest: BankManifest, previous: BankManifest | null, keep: readonly BankManifest[] = []): Promise<void> {
  const text = serializeManifest(manifest);
  // what the reader would refuse is never switched to: the bank keeps its last readable manifest
  parseManifest(text, join(dir, MANIFEST_NAME));
  await writeFileAtomic(join(dir, MANIFEST_NAME), [new TextEncoder().encode(text)]);
  await collectGarbage(dir, [manifest, ...(previous ? [previous] : []), ...keep]);
}

/** Deletes data files no given manifest references, and leftover temp files (bank lock held: no writer is active). */
export async function collectGarbage(dir: string, keep: readonly BankManifest[]): Promise<string[]> {
  const removed: string[] = [];
  const referenced = new Set(keep.flatMap((m) => Object.keys(m.files)));
  for (const subdir of ['adapters', 'bases', '.']) {
    let names: string[];
    try {
      names = await readdir(join(dir, subdir));
    } catch {
      continue;
    }
    for (const name of names) {
      const relative = subdir === '.' ? name : `${subdir}/${name}`;
      const isTemp = TEMP_FILE.test(name);
      const isData = subdir !== '.' && name.endsWith('.safetensors');
      if (isTemp || (isData && !referenced.has(relative))) {
        await unlink(join(dir, relative)).then(() => removed.push(relative), () => undefined);
      }
    }
  }
  return removed;
}
