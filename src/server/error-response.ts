/**
 * The one place where failures become HTTP responses: anything thrown (SoppuError, fastify
 * validation or body-parsing errors, unexpected bugs) is normalised to a SoppuError, whose code
 * gives the status (src/errors/soppu-error.ts), then rendered in LoRAX's {error, error_type} shape
 * or OpenAI's {error: {message, type, code}} shape.
 */
import { isSoppuError, SoppuError } from '../errors/soppu-error.js';

/** Normalises any thrown value to a SoppuError. */
export function toSoppuError(e: unknown): SoppuError {
  if (isSoppuError(e)) return e;
  const err = e as { validation?: unknown; validationContext?: string; message?: string; code?: string; statusCode?: number };
  if (err && Array.isArray(err.validation)) {
    // a JSON pointer (/parameters/top_k) as a dotted field name (parameters.top_k); a missing one by its name
    const first = err.validation[0] as { instancePath?: string; params?: { missingProperty?: string } } | undefined;
    const pointer = (first?.instancePath ?? '').replace(/^\//, '').replace(/\//g, '.');
    const missing = first?.params?.missingProperty;
    const field = missing ? (pointer ? `${pointer}.${missing}` : missing) : pointer;
    return new SoppuError('VALIDATION', `Input validation error: ${err.message ?? 'invalid request'}`, { field });
  }
  if (err?.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    return new SoppuError('VALIDATION', `Input validation error: ${err.message ?? 'unsupported content type'}`, { field: 'content-type' });
  }
  if (err?.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    // 413, as LoRAX's router (axum's body limit) and OpenAI answer it
    return new SoppuError('PAYLOAD_TOO_LARGE', `Input validation error: request body is larger than the configured limit`, { field: 'body' });
  }
  if (typeof err?.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
    // malformed JSON, empty JSON body and the like
    return new SoppuError('VALIDATION', `Input validation error: ${err.message ?? 'bad request'}`, { field: 'body' });
  }
  const message = e instanceof Error ? e.message : String(e);
  return new SoppuError('INTERNAL', `Internal error: ${message}`, {}, { cause: e });
}

/** The LoRAX-compatible message: validation and generation failures carry LoRAX's prefixes. */
function loraxMessage(err: SoppuError, generation = true): string {
  const status = err.httpStatus;
  if (generation && status === 424 && !err.message.startsWith('Request failed during generation')) return `Request failed during generation: ${err.message}`;
  if (status === 422 && !err.message.startsWith('Input validation error')) return `Input validation error: ${err.message}`;
  return err.message;
}

export function loraxErrorBody(err: SoppuError, generation = true): { error: string; error_type: string } {
  return { error: loraxMessage(err, generation), error_type: err.errorType };
}

const OPENAI_TYPES: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  403: 'permission_error',
  404: 'not_found_error',
  409: 'invalid_request_error',
  413: 'invalid_request_error',
  422: 'invalid_request_error',
  424: 'server_error',
  429: 'rate_limit_error',
  499: 'server_error',
  503: 'server_error',
};

export function openAiErrorBody(err: SoppuError, url = ''): { error: { message: string; type: string; code: string; param: string | null } } {
  const field = typeof err.context.field === 'string' && err.context.field !== '' ? err.context.field : null;
  // the fields as the OpenAI request names them: the adapter is `model`, the input `messages` or `prompt`, the
  // token budget `max_tokens`
  const input = url.startsWith('/v1/chat/') ? 'messages' : 'prompt';
  const param = field === 'adapter_id' ? 'model' : field === 'inputs' ? input : field === 'max_new_tokens' ? 'max_tokens' : field;
  // the message names the fields as this request does too (the token-budget checks are written in LoRAX's words)
  const message = loraxMessage(err).split('`inputs`').join(`\`${input}\``).split('`max_new_tokens`').join('`max_tokens`');
  return {
    error: { message, type: OPENAI_TYPES[err.httpStatus] ?? 'server_error', code: err.code.toLowerCase(), param },
  };
}

/** Which wire dialect a URL speaks. */
export function isOpenAiPath(url: string): boolean {
  return url.startsWith('/v1/');
}

/**
 * Status + body for `e` in the dialect of `url`. OpenAI answers a request it refuses as invalid with 400
 * (its clients raise BadRequestError) where LoRAX answers 422. `adminRoute`: the route is an admin one (its
 * config says so), whose failures are no generation's.
 */
export function errorResponse(e: unknown, url: string, adminRoute = false): { status: number; body: unknown; error: SoppuError } {
  const error = toSoppuError(e);
  if (!isOpenAiPath(url)) return { status: error.httpStatus, body: loraxErrorBody(error, !adminRoute), error };
  return { status: error.httpStatus === 422 ? 400 : error.httpStatus, body: openAiErrorBody(error, url), error };
}

/** LoRAX's `err` label for lorax_request_failure. */
export function failureLabel(err: SoppuError): string {
  switch (err.code) {
    case 'VALIDATION':
    case 'CONFIG':
    case 'PAYLOAD_TOO_LARGE':
      return 'validation';
    case 'OVERLOADED':
      return 'overloaded';
    case 'ADAPTER_LOAD':
    case 'ADAPTER_CONFIG':
    case 'ADAPTER_TENSORS':
    case 'ADAPTER_UNSUPPORTED':
    case 'ADAPTER_INCOMPATIBLE':
    case 'BANK_CORRUPT':
    case 'FILE_NOT_FOUND':
    case 'FILE_IO':
      return 'load_adapter';
    case 'CANCELLED':
      return 'dropped';
    case 'ADAPTER_NOT_FOUND':
    case 'UNAUTHORIZED':
    case 'FORBIDDEN':
      return 'bad_request';
    default:
      return 'generation';
  }
}
