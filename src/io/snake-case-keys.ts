/**
 * A JSON-ready copy of `value` whose camelCase field names are snake_case ("maxError" → "max_error"), as
 * SOPPU's JSON outputs spell them (the CLI's --json, report.json), while the code keeps camelCase. Only names
 * that are camelCase identifiers change: keys holding data (module paths, tensor names such as
 * "lora_A.weight") have dots or underscores and stay as they are, and a `metadata` or `config` field (a file's
 * own document) is copied as it is. Non-finite numbers, which JSON cannot
 * hold, become the strings "Infinity", "-Infinity" and "NaN".
 */
export function snakeCaseKeys(value: unknown): unknown {
  if (typeof value === 'number') return Number.isFinite(value) ? value : String(value);
  if (Array.isArray(value)) return value.map(snakeCaseKeys);
  if (value === null || typeof value !== 'object' || ArrayBuffer.isView(value)) return value;
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined).map(([key, v]) => [snakeCaseKey(key), VERBATIM.has(key) ? v : snakeCaseKeys(v)]));
}

/** Fields whose value is a document of its own, copied as it is: a safetensors file's metadata, a config.json. */
const VERBATIM = new Set(['metadata', 'config']);

const CAMEL = /^[a-z][a-z0-9]*(?:[A-Z][a-z0-9]*)+$/;

function snakeCaseKey(key: string): string {
  return CAMEL.test(key) ? key.replace(/[A-Z]/g, (upper) => `_${upper.toLowerCase()}`) : key;
}

/** `value` as the CLI prints it with --json: snake_case keys, two-space indent, a newline. */
export function jsonText(value: unknown): string {
  return `${JSON.stringify(snakeCaseKeys(value), null, 2)}\n`;
}
