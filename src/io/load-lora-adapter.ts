/**
 * Loads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into the
 * canonical LoraAdapter: factors widened to f32, A [r, in], B [out, r], scale per module.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';
import type { StDtype } from '../tensor/dtype.js';
import { CONV1D_MODULE_NAMES, loraScale, moduleRankAndAlpha, moduleTargeting, parseLoraConfig } from './lora-config.js';
import type { AdapterFlag, LoraAdapter, LoraConfig, LoraModule, PassthroughTensor } from './lora-types.js';
import { compareModulePaths, layerOfPath, moduleNameOfPath } from './module-path.js';
import { openSafetensors, type SafetensorsLimits } from './safetensors.js';
import type { SafetensorsFile, TensorInfo } from './safetensors-types.js';

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
const PICKLE_WEIGHTS_FILE = 'adapter_model.bin';
const PREFIX = 'base_model.model.';
const FLOAT_DTYPES: ReadonlySet<StDtype> = new Set(['F32', 'F16', 'BF16', 'F64']);
/** Largest finite f32: scale·B is stored (banks) and served in f32 or narrower. */
export const F32_MAX = 3.4028234663852886e38;

export interface LoadLoraAdapterOptions {
  /** Limits for the safetensors header. */
  readonly limits?: Partial<SafetensorsLimits>;
}

/** What one tensor key means once prefixes and adapter names are stripped. */
type KeyKind =
  | { kind: 'factor'; path: string; factor: 'A' | 'B'; doubledPrefix: boolean; namedAdapter: boolean }
  | { kind: 'passthrough' };

const FACTOR_KEY = /^(.+)\.lora_(A|B)(?:\.([^.]+))?\.(weight|bias)$/;

/** Classifies a tensor key; refuses DoRA, embedding LoRA and LoRA biases by name. */
export function classifyAdapterKey(key: string, file: string): KeyKind {
  let rest = key;
  let prefixes = 0;
  while (rest.startsWith(PREFIX) && prefixes < 2) {
    rest = rest.slice(PREFIX.length);
    prefixes++;
  }
  if (/(^|\.)lora_magnitude_vector(\.|$)/.test(rest)) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: tensor "${key}" is a DoRA magnitude vector: DoRA adapters are not supported (only plain LoRA)`, { file, tensor: key });
  }
  if (/(^|\.)lora_embedding_[AB](\.|$)/.test(rest)) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: tensor "${key}" is an embedding LoRA factor: LoRA on embedding layers is not supported`, { file, tensor: key });
  }
  const match = FACTOR_KEY.exec(rest);
  if (!match) return { kind: 'passthrough' };
  if (match[4] === 'bias') {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: tensor "${key}" is a LoRA bias (lora_bias): not supported`, { file, tensor: key });
  }
  // "lora_A.default.weight": the adapter's name inside the key, as a PEFT model's state_dict has it; PEFT's own files
  // leave it out, and PEFT loading such a file finds no factor (B stays 0). Taken, and flagged.
  return { kind: 'factor', path: match[1]!, factor: match[2] as 'A' | 'B', doubledPrefix: prefixes === 2, namedAdapter: match[3] !== undefined };
}

function tensorsError(file: string, tensor: string, message: string, context: Record<string, unknown> = {}): SoppuError {
  return new SoppuError('ADAPTER_TENSORS', `${file}: ${message}`, { file, tensor, ...context });
}

/** The largest adapter_config.json read (PEFT writes a few KiB; rank_pattern over every module stays far below). */
export const MAX_ADAPTER_CONFIG_BYTES = 4 * 1024 * 1024;

async function readConfig(dir: string): Promise<LoraConfig> {
  const path = join(dir, ADAPTER_CONFIG_FILE);
  let text: string;
  try {
    // bounded before it is read and parsed: JSON.parse of a large nested file can take the heap
    const size = (await stat(path)).size;
    if (size > MAX_ADAPTER_CONFIG_BYTES) {
      throw new SoppuError('ADAPTER_CONFIG', `${path}: ${size} bytes, more than an adapter config may have (limit ${MAX_ADAPTER_CONFIG_BYTES})`, { file: path, limit: MAX_ADAPTER_CONFIG_BYTES });
    }
    text = await readFile(path, 'utf8');
  } catch (e) {
    if (e instanceof SoppuError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new SoppuError('ADAPTER_CONFIG', `${path}: missing (a PEFT adapter directory needs ${ADAPTER_CONFIG_FILE})`, { file: path });
    throw new SoppuError('FILE_IO', `${path}: cannot read (${(e as Error).message})`, { file: path }, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new SoppuError('ADAPTER_CONFIG', `${path}: not valid JSON (${(e as Error).message})`, { file: path });
  }
  return parseLoraConfig(json, path);
}

async function fileExists(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** Transposes a row-major [rows, cols] matrix. */
function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(src.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[r * cols + c]!;
  return out;
}

function firstNonFinite(data: Float32Array): number {
  for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i]!)) return i;
  return -1;
}

function maxAbs(data: Float32Array): number {
  let max = 0;
  for (let i = 0; i < data.length; i++) max = Math.max(max, Math.abs(data[i]!));
  return max;
}

function isAllZero(data: Float32Array): boolean {
  for (let i = 0; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

interface FactorPair {
  a?: TensorInfo;
  b?: TensorInfo;
}

/**
 * Loads `dir`. Refuses (ADAPTER_UNSUPPORTED / ADAPTER_CONFIG / ADAPTER_TENSORS, naming file and
 * tensor): non-LoRA peft types, DoRA, embedding LoRA, `.bin`-only adapters, unpaired factors, ranks
 * that disagree between A and B or with the config, non-float or non-finite factors.
 *
 * Layout: A must be [r, in] and B [out, r]; factors stored transposed ([in, r], [r, out]) are
 * transposed. The config's fan_in_fan_out should be true exactly for GPT-2 Conv1D modules
 * (c_attn, c_proj, c_fc) or transposed factors; when it disagrees the adapter is flagged
 * 'fan-in-fan-out-mismatch'. Modules whose B or A is all zero are flagged ('zero-modules', or
 * 'all-zero' when every module is). Other tensors are kept untouched as passthrough. Every module
 * must be matched as PEFT matches it (see moduleTargeting: exclude_modules, target_modules,
 * layers_to_transform), as PEFT would only build those layers. Zero-sized factors are refused, and
 * so is a module whose scale·B would overflow f32 (a huge lora_alpha).
 */
export async function loadLoraAdapter(dir: string, options: LoadLoraAdapterOptions = {}): Promise<LoraAdapter> {
  let isDirectory = false;
  try {
    isDirectory = (await stat(dir)).isDirectory();
  } catch {
    throw new SoppuError('FILE_NOT_FOUND', `${dir}: adapter directory does not exist`, { file: dir });
  }
  if (!isDirectory) throw new SoppuError('ADAPTER_UNSUPPORTED', `${dir}: not a directory (expected a PEFT adapter directory with ${ADAPTER_CONFIG_FILE} and ${ADAPTER_WEIGHTS_FILE})`, { file: dir });
  const config = await readConfig(dir);
  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  if (!(await fileExists(weightsPath))) {
    if (await fileExists(join(dir, PICKLE_WEIGHTS_FILE))) {
      throw new SoppuError('ADAPTER_UNSUPPORTED', `${dir}: only ${PICKLE_WEIGHTS_FILE} (a pickle) is present; pickles are not loaded: convert it to ${ADAPTER_WEIGHTS_FILE}`, { file: join(dir, PICKLE_WEIGHTS_FILE) });
    }
    throw new SoppuError('ADAPTER_TENSORS', `${weightsPath}: missing (a PEFT adapter directory needs ${ADAPTER_WEIGHTS_FILE})`, { file: weightsPath });
  }
  const file = await openSafetensors(weightsPath, options.limits);
  try {
    return await readAdapter(dir, config, file);
  } finally {
    await file.close();
  }
}

async function readAdapter(dir: string, config: LoraConfig, file: SafetensorsFile): Promise<LoraAdapter> {
  const path = file.path;
  const pairs = new Map<string, FactorPair>();
  const passthroughInfos: TensorInfo[] = [];
  let doubledPrefix = false;
  let namedAdapter = false;
  for (const info of file.tensors) {
    const kind = classifyAdapterKey(info.name, path);
    if (kind.kind === 'passthrough') {
      passthroughInfos.push(info);
      continue;
    }
    doubledPrefix ||= kind.doubledPrefix;
    namedAdapter ||= kind.namedAdapter;
    const pair = pairs.get(kind.path) ?? {};
    const slot = kind.factor === 'A' ? 'a' : 'b';
    const existing = pair[slot];
    if (existing) throw tensorsError(path, info.name, `tensors "${existing.name}" and "${info.name}" are both lora_${kind.factor} of module ${kind.path}`);
    pair[slot] = info;
    pairs.set(kind.path, pair);
  }
  if (pairs.size === 0) throw tensorsError(path, '', 'holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight tensors)');

  const modules: LoraModule[] = [];
  let fanInFanOutMismatch = false;
  let zeroModules = 0;
  let sourceDtype: StDtype | null = null;
  for (const modulePath of [...pairs.keys()].sort(compareModulePaths)) {
    const { a: aInfo, b: bInfo } = pairs.get(modulePath)!;
    if (!aInfo || !bInfo) {
      const present = (aInfo ?? bInfo)!;
      throw tensorsError(path, present.name, `module ${modulePath} has lora_${aInfo ? 'A' : 'B'} ("${present.name}") but no lora_${aInfo ? 'B' : 'A'}`);
    }
    for (const info of [aInfo, bInfo]) {
      if (!FLOAT_DTYPES.has(info.dtype)) throw tensorsError(path, info.name, `tensor "${info.name}" has dtype ${info.dtype}; LoRA factors must be F32, F16, BF16 or F64`);
      if (info.shape.length !== 2) throw tensorsError(path, info.name, `tensor "${info.name}" has shape [${info.shape.join(', ')}]; LoRA factors must be 2-D`);
      // A zero-sized factor is no layer at all (a bank cannot hold a slot with 0 features).
      if (info.shape.includes(0)) throw tensorsError(path, info.name, `tensor "${info.name}" has shape [${info.shape.join(', ')}]; rank, in and out features must be at least 1`, { limit: 1 });
    }
    // PEFT only builds LoRA layers for targeted modules; weights elsewhere would be ignored there.
    const targeting = moduleTargeting(config, modulePath);
    if (!targeting.targeted) {
      const context = { file: path, tensor: aInfo.name, field: targeting.field };
      if (targeting.field === 'exclude_modules') {
        throw new SoppuError('ADAPTER_CONFIG', `${path}: module ${modulePath} has LoRA factors but is excluded by exclude_modules ${JSON.stringify(config.excludeModules)}`, context);
      }
      if (targeting.field === 'target_modules') {
        throw new SoppuError('ADAPTER_CONFIG', `${path}: module ${modulePath} has LoRA factors but is not matched by target_modules ${JSON.stringify(config.targetModules)}`, context);
      }
      const which = targeting.layer === null ? 'has no layer index (no ".<name>.<digits>." in its path) to look up' : `layer ${targeting.layer} is not`;
      throw new SoppuError('ADAPTER_CONFIG', `${path}: module ${modulePath} has LoRA factors but ${which} in layers_to_transform [${config.layersToTransform!.join(', ')}]`, context);
    }
    const layer = layerOfPath(modulePath);
    sourceDtype ??= aInfo.dtype;
    const { rank, alpha } = moduleRankAndAlpha(config, modulePath);
    const [a0, a1] = aInfo.shape as [number, number];
    const [b0, b1] = bInfo.shape as [number, number];
    const moduleName = moduleNameOfPath(modulePath);
    const conv1d = CONV1D_MODULE_NAMES.has(moduleName);
    let transposed: boolean;
    if (a0 === rank && b1 === rank) transposed = false;
    // factors stored [in, r] and [r, out]: only where PEFT's own layout cannot hold them (its A and B disagree on
    // the rank), for a GPT-2 Conv1D module, or with fan_in_fan_out; else A [4, 16], B [16, 4] with r=16 was read
    // as a 4×4 layer of rank 16, where PEFT refuses the rank
    else if (a1 === rank && b0 === rank && (a0 !== b1 || config.fanInFanOut || conv1d)) transposed = true;
    else if (a0 === b1 || a1 === b0) {
      const found = a0 === b1 ? a0 : a1;
      throw tensorsError(path, aInfo.name, `module ${modulePath} has rank ${found} (A [${a0}, ${a1}], B [${b0}, ${b1}]) but the config says r=${rank}${rank !== config.r ? ' (from rank_pattern)' : ''}`, { limit: rank });
    } else {
      throw tensorsError(path, aInfo.name, `module ${modulePath}: A [${a0}, ${a1}] and B [${b0}, ${b1}] disagree on the rank (A must be [r, in], B [out, r])`);
    }
    const inFeatures = transposed ? a0 : a1;
    const outFeatures = transposed ? b1 : b0;
    const expectFanInFanOut = transposed || conv1d;
    if (config.fanInFanOut !== expectFanInFanOut) fanInFanOutMismatch = true;

    let a = await file.readF32(aInfo.name);
    let b = await file.readF32(bInfo.name);
    for (const [info, data] of [[aInfo, a], [bInfo, b]] as const) {
      const bad = firstNonFinite(data);
      if (bad >= 0) throw tensorsError(path, info.name, `tensor "${info.name}" holds a non-finite value (${data[bad]}) at element ${bad}`);
    }
    // scale·B is what banks store and the engine serves, in f32: it must stay finite there.
    const scale = loraScale(alpha, rank, config.useRslora);
    const folded = scale * maxAbs(b);
    if (!Number.isFinite(Math.fround(folded))) {
      throw tensorsError(path, bInfo.name, `module ${modulePath}: scale ${scale} (lora_alpha ${alpha}) times the largest |lora_B| ${maxAbs(b)} is ${folded}, beyond the f32 range (±${F32_MAX})`, { limit: F32_MAX });
    }
    if (transposed) {
      a = transpose(a, inFeatures, rank); // stored [in, r] → [r, in]
      b = transpose(b, rank, outFeatures); // stored [r, out] → [out, r]
    }
    if (isAllZero(b) || isAllZero(a)) zeroModules++;
    modules.push({
      path: modulePath,
      layer,
      module: moduleName,
      rank,
      inFeatures,
      outFeatures,
      scale,
      alpha,
      a,
      b,
    });
  }

  const passthrough: PassthroughTensor[] = [];
  for (const info of passthroughInfos) {
    const data = await file.read(info.name);
    passthrough.push({ name: info.name, dtype: info.dtype, shape: info.shape, bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) });
  }
  passthrough.sort((x, y) => (x.name < y.name ? -1 : 1));

  const flags: AdapterFlag[] = [];
  if (zeroModules === modules.length) flags.push('all-zero');
  else if (zeroModules > 0) flags.push('zero-modules');
  if (fanInFanOutMismatch) flags.push('fan-in-fan-out-mismatch');
  if (doubledPrefix) flags.push('doubled-prefix');
  if (namedAdapter) flags.push('adapter-name-in-keys');
  return {
    source: dir,
    config,
    modules: new Map(modules.map((m) => [m.path, m])),
    passthrough,
    sourceDtype: sourceDtype!,
    flags,
  };
}
