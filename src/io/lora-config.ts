/**
 * adapter_config.json: parsing into LoraConfig, PEFT's pattern matching (rank_pattern,
 * alpha_pattern, target_modules) and the per-module scale.
 */
import { setFlagsFromString } from 'node:v8';
import { SoppuError } from '../errors/soppu-error.js';
import type { LoraConfig } from './lora-types.js';

// A config's regexes run on V8's backtracking engine. With this flag one that backtracks past V8's threshold is
// rerun on its linear-time engine: adjacent wildcards (`.*.*.*…x`) or `(a|aa)+` pass the nested-quantifier check
// below and took minutes on one module path (the event loop with them). Process-wide; it changes only how such
// runaway matches run.
setFlagsFromString('--enable-experimental-regexp-engine-on-excessive-backtracks');
// and the 'l' flag, with which a pattern compiles only if that engine can run it (checkPattern asks it)
setFlagsFromString('--enable-experimental-regexp-engine');

/** PEFT's defaults when a field is absent. */
const DEFAULT_R = 8;
const DEFAULT_ALPHA = 8;

/** GPT-2 style Conv1D module names: their base weight is stored [in, out] (fan_in_fan_out). */
export const CONV1D_MODULE_NAMES: ReadonlySet<string> = new Set(['c_attn', 'c_proj', 'c_fc']);

function configError(file: string, field: string, message: string, limit?: number): SoppuError {
  return new SoppuError('ADAPTER_CONFIG', `${file}: ${field}: ${message}`, { file, field, ...(limit !== undefined ? { limit } : {}) });
}

/** A config value for an error message, cut short (bounded in depth by checkConfigBounds before any is shown). */
function shown(v: unknown): string {
  const text = JSON.stringify(v) ?? String(v);
  return text.length > 80 ? `${text.slice(0, 80)}…` : text;
}

function optionalBoolean(raw: Record<string, unknown>, field: string, fallback: boolean, file: string): boolean {
  const v = raw[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw configError(file, field, `must be true or false, got ${shown(v)}`);
  return v;
}

function positiveNumber(v: unknown, field: string, file: string, integer: boolean): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || (integer && !Number.isSafeInteger(v))) {
    throw configError(file, field, `must be a positive ${integer ? 'integer' : 'number'}, got ${shown(v)}`);
  }
  return v;
}

function finiteNumber(v: unknown, field: string, file: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v)) throw configError(file, field, `must be a finite number, got ${shown(v)}`);
  return v;
}

function patternMap(raw: Record<string, unknown>, field: string, integer: boolean, file: string): Record<string, number> {
  const v = raw[field];
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw configError(file, field, 'must be an object of pattern → number');
  const out: Record<string, number> = {};
  for (const [key, value] of Object.entries(v as Record<string, unknown>)) {
    compilePattern(key, `${field}[${shown(key)}]`, file);
    const where = `${field}[${shown(key)}]`;
    Object.defineProperty(out, key, { value: integer ? positiveNumber(value, where, file, true) : finiteNumber(value, where, file), enumerable: true });
  }
  return out;
}

/** Longest regular expression accepted from a config (PEFT's are a few dozen characters). */
export const MAX_PATTERN_LENGTH = 1024;

/** A bound {n}, {n,} or {n,m} starting at lastIndex (sticky). */
const BOUND = /\{(\d+)(,(\d*))?\}/y;

/** Whether a bound BOUND matched allows more than one repetition. */
function boundRepeats(bound: RegExpExecArray): boolean {
  return bound[2] === undefined ? Number(bound[1]) > 1 : bound[3] === '' || Number(bound[3]) > 1;
}

/**
 * Where the escape (\x) or character class ([…]) of a JavaScript pattern starting at `i` ends (its last
 * character's index), or null when none starts there: their characters are no quantifiers or groups.
 */
function opaqueEnd(source: string, i: number): number | null {
  if (source[i] === '\\') return i + 1;
  if (source[i] !== '[') return null;
  let end = i + 1;
  for (; end < source.length && source[end] !== ']'; end++) if (source[end] === '\\') end++;
  return end;
}

/**
 * True when a repeated group's body itself holds a quantifier — (a+)+, (.*)*, (x*){2,} — the
 * shape that makes a backtracking engine take exponential time on a near-miss. Escapes and
 * character classes are skipped; a group's `(?:`, `(?=`, `(?<name>` prefix is not a quantifier.
 */
export function hasNestedQuantifier(pattern: string): boolean {
  const open: boolean[] = []; // per open group: does its body hold a quantifier so far?
  let closedQuantified = false; // the atom just before is a group whose body holds a quantifier
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    let repeats: boolean | null = null; // null: not a quantifier; else whether it allows more than one
    if (c === '*' || c === '+') repeats = true;
    else if (c === '?') repeats = false;
    else if (c === '{') {
      BOUND.lastIndex = i; // the whole bound, however long its digits (a 32-character window missed {000…001,20})
      const bound = BOUND.exec(pattern);
      if (bound) {
        repeats = boundRepeats(bound);
        i += bound[0].length - 1;
      }
    }
    if (repeats !== null) {
      if (closedQuantified && repeats) return true;
      if (open.length > 0) open[open.length - 1] = true;
      if (pattern[i + 1] === '?') i++; // lazy
      closedQuantified = false;
      continue;
    }
    closedQuantified = false;
    if (c === '\\') i++;
    else if (c === '[') {
      // a ] first in the class (after a ^) is a literal, not its end
      i++;
      if (pattern[i] === '^') i++;
      if (pattern[i] === ']') i++;
      for (; i < pattern.length && pattern[i] !== ']'; i++) if (pattern[i] === '\\') i++;
    } else if (c === '(') {
      open.push(false);
      if (pattern[i + 1] === '?') i++;
    } else if (c === ')') {
      const quantified = open.pop() ?? false;
      if (quantified && open.length > 0) open[open.length - 1] = true;
      closedQuantified = quantified;
    }
  }
  return false;
}

/** Whether a group of a JavaScript pattern is repeated (*, + or a bound above 1 after its closing parenthesis). */
function repeatsGroup(source: string): boolean {
  for (let i = 0; i < source.length; i++) {
    const skipped = opaqueEnd(source, i);
    if (skipped !== null) {
      i = skipped;
      continue;
    }
    if (source[i] === ')') {
      const next = source[i + 1];
      if (next === '*' || next === '+') return true;
      if (next === '{') {
        BOUND.lastIndex = i + 1;
        const bound = BOUND.exec(source);
        if (bound && boundRepeats(bound)) return true;
      }
    }
  }
  return false;
}

/**
 * Quantifiers a pattern may hold where V8's linear-time engine cannot run it, the matching's own wrapper included
 * (an alpha_pattern key is matched as ^(?:.*\.)?(?:key)$: two), so a search stays within a few powers of a path's length.
 */
const MAX_QUANTIFIERS_WITHOUT_LINEAR = 4;

/** The quantifiers (*, +, ?, {…}; a lazy ? not counted again) of a JavaScript pattern, outside classes and escapes. */
function quantifiers(source: string): number {
  let count = 0;
  for (let i = 0; i < source.length; i++) {
    const skipped = opaqueEnd(source, i);
    if (skipped !== null) {
      i = skipped;
      continue;
    }
    const c = source[i]!;
    if (c === '(' && source[i + 1] === '?') {
      i++; // a group's (?: (?= (?<name> is no quantifier
    } else if (c === '*' || c === '+' || c === '?') {
      count++;
      if (source[i + 1] === '?') i++; // lazy
    } else if (c === '{') {
      BOUND.lastIndex = i;
      const bound = BOUND.exec(source);
      if (bound) {
        count++;
        i += bound[0].length - 1;
        if (source[i + 1] === '?') i++;
      }
    }
  }
  return count;
}

/** Whether V8's linear-time engine runs `source`, a valid pattern (the 'l' flag compiles only what it can run). */
function runsInLinearTime(source: string): boolean {
  try {
    new RegExp(source, 'l');
    return true;
  } catch {
    return false;
  }
}

/**
 * Refuses a valid config regex that can backtrack catastrophically, naming the field. A repeated group holding a
 * quantifier ((\w+\.)+, as PEFT configs write) is taken when V8's linear-time engine can run it: a match that
 * backtracks too long falls back to that engine (the flag above). Where that engine cannot (a bounded repeat such
 * as {1,20} inside the group, a backreference, a lookaround), there is no fallback, and it is refused.
 */
function checkPattern(pattern: string, source: string, field: string, file: string): void {
  if (runsInLinearTime(source)) return; // a runaway match falls back to that engine
  if (hasNestedQuantifier(pattern) || hasNestedQuantifier(source)) {
    throw configError(file, field, `regular expression ${shown(pattern)} repeats a group that itself holds a quantifier (like (a+)+) in a form V8's linear-time engine cannot run (a bounded repeat such as {1,20}, a backreference or a lookaround), which can take exponential time to match; write it without nesting the quantifiers`);
  }
  // without that engine, a repeated group can backtrack exponentially even without a quantifier inside it: its
  // alternatives may overlap ((?=b)([\w.]|[\w.])*x never ended on a module path)
  if (repeatsGroup(source)) {
    throw configError(file, field, `regular expression ${shown(pattern)} repeats a group beside a backreference, lookaround or bounded repeat (which V8's linear-time engine cannot run), so a match can take exponential time; write it without repeating a group`);
  }
  // and each quantifier multiplies the ways to split the path: (?=b).*.*.*.*.*.*.*x took 1.2 s on a module path, and
  // optional atoms (.?.?.? …) or bounded repeats grow the same way
  if (quantifiers(source) > MAX_QUANTIFIERS_WITHOUT_LINEAR) {
    throw configError(file, field, `regular expression ${shown(pattern)} has more than ${MAX_QUANTIFIERS_WITHOUT_LINEAR} quantifiers (*, +, ?, {…}; the matching's own included) beside a backreference, lookaround or bounded repeat, which can take very long to match; write it with fewer`, MAX_QUANTIFIERS_WITHOUT_LINEAR);
  }
}

/** Escapes that mean the same in Python's re and JavaScript (outside and inside character classes). */
const SHARED_ESCAPES = new Set([...'dDwWsSbBnrtfvxu0123456789']);
/** Python's {,n} at lastIndex, however long its digits (JavaScript reads it as text). */
const OPEN_BOUND = /\{,(\d+)\}/y;
/** Python's (?P=name) at lastIndex. */
const NAMED_REFERENCE = /\(\?P=(\w+)\)/y;

/**
 * A Python `re` pattern (as PEFT's configs are written) in JavaScript's syntax: \A and \Z (anchors in Python,
 * plain letters to JavaScript) become ^ and $, (?P<name>…) and (?P=name) named groups; a letter escape that
 * JavaScript would read as the bare letter where Python means something else (or refuses) is refused.
 */
function fromPythonRegex(pattern: string, field: string, file: string): string {
  let out = '';
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    if (c === '\\') {
      const next = pattern[i + 1] ?? '';
      i++;
      if (!inClass && next === 'A') out += '^';
      else if (!inClass && next === 'Z') out += '$';
      else if (/[A-Za-z]/.test(next) && !SHARED_ESCAPES.has(next)) {
        throw configError(file, field, `regular expression ${shown(pattern)} uses the escape \\${next}, which JavaScript reads as the letter ${next} (Python means something else by it, or refuses it)`);
      } else out += `\\${next}`;
      continue;
    }
    if (inClass) {
      if (c === ']') inClass = false;
      out += c;
      continue;
    }
    if (c === '[') {
      inClass = true;
      out += c;
      if (pattern[i + 1] === '^') out += pattern[++i];
      if (pattern[i + 1] === ']') {
        out += '\\]'; // a leading ] is a literal in Python; JavaScript would close the class on it
        i++;
      }
      continue;
    }
    if (pattern.startsWith('(?P<', i)) {
      out += '(?<';
      i += 3;
      continue;
    }
    // Python's {,n} is a bound (0 to n); JavaScript reads it as text
    OPEN_BOUND.lastIndex = i;
    const openBound = OPEN_BOUND.exec(pattern);
    if (openBound) {
      out += `{0,${openBound[1]}}`;
      i += openBound[0].length - 1;
      continue;
    }
    NAMED_REFERENCE.lastIndex = i;
    const reference = NAMED_REFERENCE.exec(pattern);
    if (reference) {
      out += `\\k<${reference[1]}>`;
      i += reference[0].length - 1;
      continue;
    }
    out += c;
  }
  return out;
}

/** Config regexes already checked and compiled, by wrapper and Python text (matching reuses them per module). */
const checkedRegexes = new Map<string, RegExp>();
/** Most regexes kept (the cache starts over past it: configs come from callers). */
const MAX_CHECKED_REGEXES = 1024;

/**
 * `pattern` (Python syntax) translated, placed in `wrap`, and compiled once, after its checks: its length, that
 * it compiles, and checkPattern. Errors name `field` in `file`.
 */
function compileChecked(pattern: string, wrap: (source: string) => string, kind: string, field: string, file: string): RegExp {
  const key = `${kind}\0${pattern}`;
  const cached = checkedRegexes.get(key);
  if (cached) return cached;
  const source = wrap(fromPythonRegex(pattern, field, file));
  if (pattern.length > MAX_PATTERN_LENGTH) {
    throw configError(file, field, `regular expression is ${pattern.length} characters (limit ${MAX_PATTERN_LENGTH})`, MAX_PATTERN_LENGTH);
  }
  let regex: RegExp;
  try {
    regex = new RegExp(source);
  } catch {
    throw configError(file, field, `is not a valid regular expression: ${shown(pattern)}`);
  }
  checkPattern(pattern, source, field, file);
  if (checkedRegexes.size >= MAX_CHECKED_REGEXES) checkedRegexes.clear();
  checkedRegexes.set(key, regex);
  return regex;
}

/** PEFT: re.match(rf"(.*\.)?({key})$", module_path) — the key matches a dotted suffix of the path. */
function compilePattern(key: string, field: string, file: string): RegExp {
  return compileChecked(key, (source) => `^(?:.*\\.)?(?:${source})$`, 'suffix', field, file);
}

/** A whole-path regex (PEFT's re.fullmatch), checked like every config regex. */
function compileFullMatch(pattern: string, field: string, file: string): RegExp {
  return compileChecked(pattern, (source) => `^(?:${source})$`, 'full', field, file);
}

/** PEFT's layer index regex (`.*\.{layers_pattern}\.(\d+)\.`), checked; without a pattern any component. */
function compileLayerPattern(pattern: string | null, field: string, file: string): RegExp {
  if (pattern === null) return /^.*\.[^.]*\.(\d+)\./;
  return compileChecked(pattern, (source) => `^.*\\.(?:${source})\\.(\\d+)\\.`, 'layer', field, file);
}

/** Deepest nesting accepted in adapter_config.json (PEFT writes 3 levels). */
export const MAX_CONFIG_DEPTH = 64;
/** Most JSON values (objects, arrays, scalars) accepted in adapter_config.json. */
export const MAX_CONFIG_VALUES = 100_000;

/**
 * Bounds the config's nesting and size without recursion: the raw config is kept (bank manifest,
 * export), and serialising a structure thousands of levels deep overflows the stack.
 */
function checkConfigBounds(json: Record<string, unknown>, file: string): void {
  const stack: { value: unknown; depth: number; field: string }[] = Object.entries(json).map(([field, value]) => ({ value, depth: 2, field }));
  let values = 1 + stack.length;
  while (stack.length > 0) {
    const { value, depth, field } = stack.pop()!;
    if (typeof value !== 'object' || value === null) continue;
    if (depth > MAX_CONFIG_DEPTH) throw configError(file, field, `nests deeper than ${MAX_CONFIG_DEPTH} levels (limit ${MAX_CONFIG_DEPTH})`, MAX_CONFIG_DEPTH);
    const children = Array.isArray(value) ? value : Object.values(value);
    values += children.length;
    if (values > MAX_CONFIG_VALUES) throw configError(file, field, `the config holds more than ${MAX_CONFIG_VALUES} JSON values (limit ${MAX_CONFIG_VALUES})`, MAX_CONFIG_VALUES);
    for (const child of children) stack.push({ value: child, depth: depth + 1, field });
  }
}

/** A list of names or one regular expression (target_modules, exclude_modules). */
function modulesSelector(raw: Record<string, unknown>, field: string, file: string): readonly string[] | string | null {
  const v = raw[field];
  if (v === undefined || v === null) return null;
  if (typeof v === 'string') {
    // PEFT compares target_modules.lower() with "all-linear"
    if (field === 'target_modules' && v.toLowerCase() === 'all-linear') return 'all-linear';
    compileFullMatch(v, field, file);
    return v;
  }
  if (Array.isArray(v) && v.every((t) => typeof t === 'string')) return [...(v as string[])];
  throw configError(file, field, 'must be a list of module names or a regular expression string');
}

const UNSUPPORTED_PEFT_TYPES_HINT = 'only LORA is supported (not ADALORA, IA3, LOHA, LOKR, prompt or prefix tuning, …)';

/** Parses and validates adapter_config.json content. `file` names the file in errors. */
export function parseLoraConfig(json: unknown, file: string): LoraConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw configError(file, '(root)', 'must be a JSON object');
  const raw = json as Record<string, unknown>;
  checkConfigBounds(raw, file);
  const peftType = raw['peft_type'];
  if (peftType === undefined) throw configError(file, 'peft_type', 'is missing (expected "LORA")');
  if (peftType !== 'LORA') {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: peft_type ${shown(peftType)} is not supported: ${UNSUPPORTED_PEFT_TYPES_HINT}`, { file, field: 'peft_type' });
  }
  if (raw['use_dora'] === true) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: use_dora is true: DoRA adapters are not supported (only plain LoRA)`, { file, field: 'use_dora' });
  }
  if (raw['lora_bias'] === true) {
    throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: lora_bias is true: LoRA B biases are not supported`, { file, field: 'lora_bias' });
  }
  // initialisations PEFT re-runs at load, changing the base weights (W − s·B₀A₀, or a quantised W): served as
  // plain LoRA they would be off by the base model's top components
  const init = raw['init_lora_weights'];
  if (typeof init === 'string' && /^(pissa|olora|loftq|corda)/i.test(init)) {
    throw new SoppuError(
      'ADAPTER_UNSUPPORTED',
      `${file}: init_lora_weights ${shown(init)} changes the base model when PEFT loads the adapter; convert it to a plain LoRA first (PEFT's save_pretrained with path_initial_model_for_weight_conversion)`,
      { file, field: 'init_lora_weights' },
    );
  }
  // applied to some tokens only (activated LoRA), or to a deeper stack of layers: not what a plain LoRA slot does
  for (const field of ['alora_invocation_tokens', 'layer_replication'] as const) {
    const value = raw[field];
    if (value !== undefined && value !== null && !(Array.isArray(value) && value.length === 0)) {
      throw new SoppuError('ADAPTER_UNSUPPORTED', `${file}: ${field} is set: ${field === 'layer_replication' ? 'replicated layers' : 'activated LoRA (applied after an invocation sequence only)'} is not supported`, { file, field });
    }
  }
  const r = raw['r'] === undefined ? DEFAULT_R : positiveNumber(raw['r'], 'r', file, true);
  // PEFT does not check lora_alpha: a negative one negates the adapter, zero silences it
  const loraAlpha = raw['lora_alpha'] === undefined ? DEFAULT_ALPHA : finiteNumber(raw['lora_alpha'], 'lora_alpha', file);

  const targetModules = modulesSelector(raw, 'target_modules', file) ?? [];
  // PEFT fills in the model type's defaults before it saves, so only a hand-written config has none; which
  // modules PEFT would then adapt depends on the model, so the factors present cannot be trusted to be them
  if (Array.isArray(targetModules) && targetModules.length === 0) {
    throw configError(file, 'target_modules', 'is missing or empty: name the adapted modules (PEFT fills them in when it saves an adapter)');
  }
  const excludeModules = modulesSelector(raw, 'exclude_modules', file);

  let layersToTransform: number[] | null = null;
  const layers = raw['layers_to_transform'];
  if (typeof layers === 'number') layersToTransform = [layers];
  else if (Array.isArray(layers)) layersToTransform = layers as number[];
  else if (layers !== undefined && layers !== null) throw configError(file, 'layers_to_transform', 'must be an integer or a list of integers');
  if (layersToTransform?.some((l) => !Number.isSafeInteger(l) || l < 0)) throw configError(file, 'layers_to_transform', 'must hold non-negative integers');
  const pattern = raw['layers_pattern'];
  let layersPattern: readonly string[] | null = null;
  if (typeof pattern === 'string') layersPattern = pattern === '' ? null : [pattern];
  else if (Array.isArray(pattern) && pattern.every((p) => typeof p === 'string')) layersPattern = pattern.length === 0 ? null : [...(pattern as string[])];
  else if (pattern !== undefined && pattern !== null) throw configError(file, 'layers_pattern', 'must be a string or a list of strings');
  layersPattern?.forEach((p, i) => compileLayerPattern(p, `layers_pattern[${i}]`, file));
  // as LoraConfig.__post_init__ refuses them ("all-linear" is a string there too)
  if (typeof targetModules === 'string' && layers !== undefined && layers !== null) {
    throw configError(file, 'layers_to_transform', 'cannot be used when target_modules is a string (a regular expression or "all-linear"), as PEFT refuses it');
  }
  if (typeof targetModules === 'string' && pattern !== undefined && pattern !== null) {
    throw configError(file, 'layers_pattern', 'cannot be used when target_modules is a string (a regular expression or "all-linear"), as PEFT refuses it');
  }
  if (layersPattern !== null && (layersToTransform === null || layersToTransform.length === 0)) {
    throw configError(file, 'layers_pattern', 'is given without layers_to_transform, which PEFT refuses');
  }

  const save = raw['modules_to_save'];
  if (save !== undefined && save !== null && !(Array.isArray(save) && save.every((s) => typeof s === 'string'))) {
    throw configError(file, 'modules_to_save', 'must be a list of module names');
  }
  const bias = raw['bias'] ?? 'none';
  if (bias !== 'none' && bias !== 'all' && bias !== 'lora_only') throw configError(file, 'bias', `must be "none", "all" or "lora_only", got ${shown(bias)}`);
  const base = raw['base_model_name_or_path'];
  if (base !== undefined && base !== null && typeof base !== 'string') throw configError(file, 'base_model_name_or_path', 'must be a string');

  return {
    peftType: 'LORA',
    r,
    loraAlpha,
    useRslora: optionalBoolean(raw, 'use_rslora', false, file),
    targetModules,
    excludeModules,
    rankPattern: patternMap(raw, 'rank_pattern', true, file),
    alphaPattern: patternMap(raw, 'alpha_pattern', false, file),
    fanInFanOut: optionalBoolean(raw, 'fan_in_fan_out', false, file),
    layersToTransform,
    layersPattern,
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

/** Why PEFT would not build a LoRA layer for a module: the config field that leaves it out. */
export type ModuleTargeting =
  | { readonly targeted: true }
  | { readonly targeted: false; readonly field: 'exclude_modules' }
  | { readonly targeted: false; readonly field: 'target_modules' }
  | { readonly targeted: false; readonly field: 'layers_to_transform'; readonly layer: number | null };

function listMatches(list: readonly string[], modulePath: string): boolean {
  return list.some((t) => modulePath === t || modulePath.endsWith(`.${t}`));
}

/**
 * PEFT's _check_target_module_exists: exclude_modules first (string: regex full match; list: equal
 * or dotted suffix); then target_modules — a regex string must match the whole path, a list entry
 * must equal the path or be a dotted suffix of it. layers_to_transform (with layers_pattern) narrows
 * only a suffix match: not a regex string, nor a list entry naming the whole path. 'all-linear'
 * stands for a list of the model's linear layers. An empty list cannot be checked here (PEFT would
 * use the model type's defaults) and matches every module.
 */
export function moduleTargeting(config: LoraConfig, modulePath: string): ModuleTargeting {
  const exclude = config.excludeModules ?? null;
  if (typeof exclude === 'string' ? compileFullMatch(exclude, 'exclude_modules', '').test(modulePath) : exclude !== null && listMatches(exclude, modulePath)) {
    return { targeted: false, field: 'exclude_modules' };
  }
  const targets = config.targetModules;
  // 'all-linear' is every linear layer but the output layer (PEFT leaves lm_head out)
  if (targets === 'all-linear' && /(^|\.)lm_head$/.test(modulePath)) return { targeted: false, field: 'target_modules' };
  if (typeof targets === 'string' && targets !== 'all-linear') {
    return compileFullMatch(targets, 'target_modules', '').test(modulePath) ? { targeted: true } : { targeted: false, field: 'target_modules' };
  }
  if (typeof targets !== 'string' && targets.includes(modulePath)) return { targeted: true };
  if (typeof targets !== 'string' && targets.length > 0 && !listMatches(targets, modulePath)) return { targeted: false, field: 'target_modules' };
  const layers = config.layersToTransform;
  if (layers && layers.length > 0) {
    let layer: number | null = null;
    for (const pattern of config.layersPattern ?? [null]) {
      const match = compileLayerPattern(pattern, 'layers_pattern', '').exec(modulePath);
      if (match) {
        layer = Number(match[match.length - 1]);
        break;
      }
    }
    if (layer === null || !layers.includes(layer)) return { targeted: false, field: 'layers_to_transform', layer };
  }
  return { targeted: true };
}
