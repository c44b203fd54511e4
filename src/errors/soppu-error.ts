/**
 * The one registry of typed errors. Every failure a user can see is a SoppuError with a stable
 * `code`; the HTTP status for each code lives here too (the server maps through `httpStatusOf`),
 * so the mapping exists in exactly one place.
 *
 * Add a code by adding one row to ERROR_CODES. Never reuse or rename a code: clients match on it.
 */

/** code → [HTTP status, LoRAX-style error_type, one-line meaning] */
export const ERROR_CODES = {
  // --- input files (safetensors, PEFT, model, bank) ---
  SAFETENSORS_HEADER: [422, 'validation', 'safetensors header is malformed or exceeds a limit'],
  SAFETENSORS_TENSOR: [422, 'validation', 'a safetensors tensor entry is malformed or out of bounds'],
  SAFETENSORS_DTYPE: [422, 'validation', 'unsupported or mismatched tensor dtype'],
  FILE_NOT_FOUND: [424, 'generation', 'a required file does not exist'],
  FILE_IO: [424, 'generation', 'a file could not be read or written'],
  ADAPTER_CONFIG: [424, 'generation', 'adapter_config.json is missing, malformed or names an unsupported feature'],
  ADAPTER_UNSUPPORTED: [424, 'generation', 'the adapter type or file format is not supported'],
  ADAPTER_TENSORS: [424, 'generation', 'adapter tensors are missing, mismatched or malformed'],
  ADAPTER_INCOMPATIBLE: [424, 'generation', 'the adapter does not match the base model or the other adapters'],
  MODEL_CONFIG: [500, 'generation', 'the model config is missing or unsupported'],
  MODEL_WEIGHTS: [500, 'generation', 'the model weights are missing or malformed'],
  BANK_CORRUPT: [424, 'generation', 'the adapter bank failed validation'],
  BANK_CONFLICT: [409, 'validation', 'the bank already holds this id, or the change conflicts with it'],
  // --- requests ---
  VALIDATION: [422, 'validation', 'a request field is missing or out of range'],
  PAYLOAD_TOO_LARGE: [413, 'validation', 'the request body is larger than the server accepts'],
  ADAPTER_NOT_FOUND: [404, 'not_found', 'no adapter with this id is available to the caller'],
  ADAPTER_LOAD: [424, 'generation', 'the adapter named by the request could not be loaded'],
  GENERATION: [424, 'generation', 'generation failed'],
  OVERLOADED: [429, 'overloaded', 'the server is at its concurrency or queue limit'],
  UNAUTHORIZED: [401, 'unauthorized', 'missing or invalid API key'],
  FORBIDDEN: [403, 'forbidden', 'this key may not use this route'],
  CANCELLED: [499, 'cancelled', 'the request was cancelled'],
  SHUTTING_DOWN: [503, 'unhealthy', 'the server is draining and accepts no new requests'],
  // --- internal ---
  KERNEL: [500, 'internal', 'a compute kernel was called with invalid arguments'],
  LINALG: [500, 'internal', 'a linear-algebra routine failed to converge or got bad input'],
  CONFIG: [422, 'validation', 'a command-line option or configuration value is invalid'],
  INTERNAL: [500, 'internal', 'an internal invariant was violated'],
} as const satisfies Record<string, readonly [number, string, string]>;

export type ErrorCode = keyof typeof ERROR_CODES;

/** Structured context that names what was wrong: the file, the tensor or field, the limit. */
export interface ErrorContext {
  file?: string;
  tensor?: string;
  field?: string;
  limit?: string | number;
  [key: string]: unknown;
}

/** A typed, user-facing error with a stable code. */
export class SoppuError extends Error {
  readonly code: ErrorCode;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SoppuError';
    this.code = code;
    this.context = context;
  }

  /** HTTP status for this error (the one mapping, used by the server). */
  get httpStatus(): number {
    return ERROR_CODES[this.code][0];
  }

  /** LoRAX-compatible `error_type` string. */
  get errorType(): string {
    return ERROR_CODES[this.code][1];
  }
}

/** True when `e` is a SoppuError (optionally of the given code). */
export function isSoppuError(e: unknown, code?: ErrorCode): e is SoppuError {
  return e instanceof SoppuError && (code === undefined || e.code === code);
}

/** HTTP status for any thrown value: SoppuErrors by code, anything else 500. */
export function httpStatusOf(e: unknown): number {
  return isSoppuError(e) ? e.httpStatus : 500;
}
