/**
 * adapter_config.json: parsing into LoraConfig, PEFT's pattern matching (rank_pattern,
 * alpha_pattern, target_modules) and the per-module scale.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraConfig } from './lora-types.js';

/** PEFT's defaults when a field is absent. */
const DEFAULT_R = 8;
const DEFAULT_ALPHA = 8;

/** GPT-2 style Conv1D module names: their base weight is stored [in, out] (fan_in_fan_out). */
export const CONV1D_MODULE_NAMES: ReadonlySet<string> = new Set(['c_attn', 'c_proj', 'c_fc']);

function configError(file: string, field: string, message: string): SoppuError {
  return new SoppuError('ADAPTER_CONFIG', `${file}: ${field}: ${message}`, { file, field });
}

function optionalBoolean(raw: Record<string, unknown>, field: string, fallback: boolean, file: string): boolean {
  const v = raw[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw configError(file, field, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function positiveNumber(v: unknown, field: string, file: string, integer: boolean): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || (integer && !Number.isSafeInteger(v))) {
    throw configError(file, field, `must be a positive ${integer ? 'integer' : 'number'}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function patternMap(raw: Record<string, unknown>, field: string, integer: boolean, file: string): Record<string, number> {
  const v = raw[field];
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw configError(file, field, 'must be an object of pattern → number');
  const out: Record<string, number> = {};
  for (const [key, value] of Object.entries(v as Record<string, unknown>)) {
    compilePattern(key, `${field}["${key}"]`, file);
    Object.defineProperty(out, key, { value: positiveNumber(value, `${field}["${key}"]`, file, integer), enumerable: true });
  }
  return out;
}

function compilePattern(key: string, field: string, file: string): RegExp {
  try {
    // PEFT: re.match(rf"(.*\.)?({key})$", module_path) — the key matches a dotted suffix of the path.
    return new RegExp(`^(?:.*\\.)?(?:${key})$`);
  } catch {
    throw configError(file, field, `is not a valid regular expression: ${JSON.stringify(key)}`);
  }
}

const UNSUPPORTED_PEFT_TYPES_HINT = 'only LORA is supported (not ADALORA, IA3, LOHA, LOKR, prompt or prefix tuning, …)';

/** Parses and validates adapter_config.json content. `file` names the file in errors. */
export function parseLoraConfig(json: unknown, file: string): LoraConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw configError(file, '(root)', 'must be a JSON object');
  const raw = json as Record<string, unknown>;
  const peftType = raw['peft_type'];
  if (peftType === undefined) throw configError(file, 'peft_type', 'is missing (expected "LORA")');
  if (peftType !== 'LORA') {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: peft_type ${JSON.stringify(peftType)} is not supported: ${UNSUPPORTED_PEFT_TYPES_HINT}`, { file, field: 'peft_type' });
  }
  if (raw['use_dora'] === true) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: use_dora is true: DoRA adapters are not supported (only plain LoRA)`, { file, field: 'use_dora' });
  }
  if (raw['lora_bias'] === true) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: lora_bias is true: LoRA B biases are not supported`, { file, field: 'lora_bias' });
  }
  const r = raw['r'] === undefined ? DEFAULT_R : positiveNumber(raw['r'], 'r', file, true);
  const loraAlpha = raw['lora_alpha'] === undefined ? DEFAULT_ALPHA : positiveNumber(raw['lora_alpha'], 'lora_alpha', file, false);

  let targetModules: readonly string[] | string;
  const targets = raw['target_modules'];
  if (targets === undefined || targets === null) targetModules = [];
  else if (typeof targets === 'string') {
    if (targets !== 'all-linear') compilePattern(targets, 'target_modules', file);
    targetModules = targets;
  } else if (Array.isArray(targets) && targets.every((t) => typeof t === 'string')) targetModules = [...(targets as string[])];
  else throw configError(file, 'target_modules', 'must be a list of module names or a regular expression string');

  let layersToTransform: number[] | null = null;
  const layers = raw['layers_to_transform'];
  if (typeof layers === 'number') layersToTransform = [layers];
  else if (Array.isArray(layers)) layersToTransform = layers as number[];
  else if (layers !== undefined && layers !== null) throw configError(file, 'layers_to_transform', 'must be an integer or a list of integers');
  if (layersToTransform?.some((l) => !Number.isSafeInteger(l) || l < 0)) throw configError(file, 'layers_to_transform', 'must hold non-negative integers');

  const save = raw['modules_to_save'];
  if (save !== undefined && save !== null && !(Array.isArray(save) && save.every((s) => typeof s === 'string'))) {
    throw configError(file, 'modules_to_save', 'must be a list of module names');
  }
  const bias = raw['bias'] ?? 'none';
  if (bias !== 'none' && bias !== 'all' && bias !== 'lora_only') throw configError(file, 'bias', `must be "none", "all" or "lora_only", got ${JSON.stringify(bias)}`);
  const base = raw['base_model_name_or_path'];
  if (base !== undefined && base !== null && typeof base !== 'string') throw configError(file, 'base_model_name_or_path', 'must be a string');

  return {
    peftType: 'LORA',
    r,
    loraAlpha,
    useRslora: optionalBoolean(raw, 'use_rslora', false, file),
    targetModules,
    rankPattern: patternMap(raw, 'rank_pattern', true, file),
    alphaPattern: patternMap(raw, 'alpha_pattern', false, file),
    fanInFanOut: optionalBoolean(raw, 'fan_in_fan_out', false, file),
    layersToTransform,
    modulesToSave: save === undefined || save === null ? null : [...(save as string[])],
    bias,
    baseModelNameOrPath: typeof base === 'string' ? base : null,
    raw,
  };
}

/** The first pattern key (in insertion order) matching the module path, as PEFT's get_pattern_key does. */
export function matchPatternKey(patterns: Readonly<Record<string, number>>, modulePath: string): string | null {
  for (const key of Object.keys(patterns)) {
    if (compilePattern(key, 'pattern', '').test(modulePath)) return key;
  }
  return null;
}

/** Rank and alpha of one module with rank_pattern / alpha_pattern applied. */
export function moduleRankAndAlpha(config: LoraConfig, modulePath: string): { rank: number; alpha: number } {
  const rankKey = matchPatternKey(config.rankPattern, modulePath);
  const alphaKey = matchPatternKey(config.alphaPattern, modulePath);
  return {
    rank: rankKey === null ? config.r : config.rankPattern[rankKey]!,
    alpha: alphaKey === null ? config.loraAlpha : config.alphaPattern[alphaKey]!,
  };
}

/** alpha / r, or alpha / √r with rsLoRA. */
export function loraScale(alpha: number, rank: number, useRslora: boolean): number {
  return useRslora ? alpha / Math.sqrt(rank) : alpha / rank;
}

/** PEFT's target check: a regex string must match the whole path; a list entry must equal the path or a dotted suffix. */
export function isTargetModule(config: LoraConfig, modulePath: string): boolean {
  const targets = config.targetModules;
  if (typeof targets === 'string') return targets === 'all-linear' || new RegExp(`^(?:${targets})$`).test(modulePath);
  return targets.some((t) => modulePath === t || modulePath.endsWith(`.${t}`));
}
