/**
 * JSON Schemas for every request body, built per server from its limits. Ranges are LoRAX's
 * (router/src/validation.rs). LoRAX's serde structs ignore unknown fields, so the generation bodies
 * stay lenient about them; our own admin bodies reject unknown fields.
 */
import type { ServerOptions } from './server-options.js';

const nullableNumber = (extra: Record<string, unknown>): Record<string, unknown> => ({ type: ['number', 'null'], ...extra });
const nullableInteger = (extra: Record<string, unknown>): Record<string, unknown> => ({ type: ['integer', 'null'], ...extra });
const MAX_SEED = Number.MAX_SAFE_INTEGER;

/** The most choices one OpenAI request may ask for (n × prompts): each is a generation of its own. */
export const MAX_CHOICES = 16;

export function buildSchemas(options: Pick<ServerOptions, 'maxStopSequences' | 'maxInputTokens' | 'maxTotalTokens' | 'maxAlternatives'>) {
  const stopArray = { type: 'array', items: { type: 'string', minLength: 1 }, maxItems: options.maxStopSequences };
  const parameters = {
    type: 'object',
    properties: {
      adapter_id: { type: ['string', 'null'] },
      adapter_source: { type: ['string', 'null'] },
      merged_adapters: { type: ['object', 'null'] },
      api_token: { type: ['string', 'null'] },
      best_of: nullableInteger({ minimum: 1 }),
      max_new_tokens: nullableInteger({ exclusiveMinimum: 0, maximum: options.maxTotalTokens }),
      // LoRAX refuses temperature 0 and top_p 1 here (greedy is do_sample false; 1 is top_p's unset value)
      temperature: nullableNumber({ exclusiveMinimum: 0 }),
      top_k: nullableInteger({ exclusiveMinimum: 0 }),
      top_p: nullableNumber({ exclusiveMinimum: 0, exclusiveMaximum: 1 }),
      typical_p: nullableNumber({ exclusiveMinimum: 0, exclusiveMaximum: 1 }),
      repetition_penalty: nullableNumber({ exclusiveMinimum: 0 }),
      frequency_penalty: nullableNumber({ minimum: -2, maximum: 2 }),
      presence_penalty: nullableNumber({ minimum: -2, maximum: 2 }),
      do_sample: { type: 'boolean' },
      seed: nullableInteger({ minimum: 0, maximum: MAX_SEED }),
      stop: stopArray,
      return_full_text: { type: ['boolean', 'null'] },
      truncate: nullableInteger({ exclusiveMinimum: 0, maximum: options.maxInputTokens }),
      ignore_eos_token: { type: 'boolean' },
      watermark: { type: 'boolean' },
      details: { type: 'boolean' },
      decoder_input_details: { type: 'boolean' },
      return_k_alternatives: nullableInteger({ exclusiveMinimum: 0, maximum: options.maxAlternatives }),
      apply_chat_template: { type: 'boolean' },
      response_format: { type: ['object', 'null'], properties: { type: { type: 'string', enum: ['text', 'json_object', 'json_schema'] } } },
    },
  };
  const generate = {
    type: 'object',
    required: ['inputs'],
    properties: { inputs: { type: 'string', minLength: 1 }, parameters },
  };
  const compat = {
    type: 'object',
    required: ['inputs'],
    properties: { inputs: { type: 'string', minLength: 1 }, parameters, stream: { type: 'boolean' } },
  };
  const openAiCommon = {
    model: { type: 'string' },
    max_tokens: nullableInteger({ exclusiveMinimum: 0, maximum: options.maxTotalTokens }),
    max_completion_tokens: nullableInteger({ exclusiveMinimum: 0, maximum: options.maxTotalTokens }),
    temperature: nullableNumber({ minimum: 0, maximum: 2 }),
    top_p: nullableNumber({ exclusiveMinimum: 0, maximum: 1 }),
    n: nullableInteger({ minimum: 1, maximum: MAX_CHOICES }),
    stop: { anyOf: [{ type: 'string', minLength: 1 }, stopArray, { type: 'null' }] },
    stream: { type: ['boolean', 'null'] }, // OpenAI's nullable fields: null is as absent
    stream_options: { type: ['object', 'null'], properties: { include_usage: { type: 'boolean' } } },
    seed: nullableInteger({ minimum: 0, maximum: MAX_SEED }),
    presence_penalty: nullableNumber({ minimum: -2, maximum: 2 }),
    frequency_penalty: nullableNumber({ minimum: -2, maximum: 2 }),
    repetition_penalty: nullableNumber({ exclusiveMinimum: 0 }),
    top_k: nullableInteger({ exclusiveMinimum: 0 }),
    ignore_eos_token: { type: ['boolean', 'null'] },
    logit_bias: { type: ['object', 'null'] },
    adapter_source: { type: ['string', 'null'] },
    api_token: { type: ['string', 'null'] },
    response_format: { type: ['object', 'null'], properties: { type: { type: 'string', enum: ['text', 'json_object', 'json_schema'] } } },
  };
  const tokenId = { type: 'integer', minimum: 0 };
  const promptList = { minItems: 1, maxItems: MAX_CHOICES };
  const completions = {
    type: 'object',
    required: ['prompt'],
    properties: {
      ...openAiCommon,
      prompt: {
        anyOf: [
          { type: 'string', minLength: 1 },
          { type: 'array', items: { type: 'string', minLength: 1 }, ...promptList },
          { type: 'array', items: tokenId, minItems: 1, maxItems: options.maxInputTokens },
          { type: 'array', items: { type: 'array', items: tokenId, minItems: 1, maxItems: options.maxInputTokens }, ...promptList },
        ],
      },
      echo: { type: ['boolean', 'null'] },
      suffix: { type: ['string', 'null'] },
      logprobs: nullableInteger({ minimum: 0, maximum: 5 }), // OpenAI's limit
      best_of: nullableInteger({ minimum: 1 }),
    },
  };
  const chat = {
    type: 'object',
    required: ['messages'],
    properties: {
      ...openAiCommon,
      messages: {
        type: 'array',
        minItems: 1,
        // every message renders to at least one token in a chat template: more could never fit, and templating
        // 100k of them held the event loop for ~0.9 s before the length check
        maxItems: options.maxInputTokens,
        items: {
          type: 'object',
          required: ['role'],
          properties: {
            role: { type: 'string', enum: ['system', 'user', 'assistant', 'developer'] }, // no tool messages: tools are refused
            content: {
              anyOf: [
                { type: 'string' },
                { type: 'null' },
                { type: 'array', items: { type: 'object', required: ['type'], properties: { type: { type: 'string' }, text: { type: 'string' } } } },
              ],
            },
          },
        },
      },
      tools: { type: ['array', 'null'] },
      logprobs: { type: ['boolean', 'null'] },
      top_logprobs: nullableInteger({ minimum: 0, maximum: 20 }), // OpenAI's limit
    },
  };
  const tokenize = {
    type: 'object',
    required: ['inputs'],
    properties: { inputs: { type: 'string' }, add_special_tokens: { type: 'boolean' } },
  };
  const registerAdapter = {
    type: 'object',
    required: ['id', 'path'],
    additionalProperties: false,
    properties: {
      id: { type: 'string', minLength: 1, maxLength: 256, pattern: '^[A-Za-z0-9][A-Za-z0-9._/@:+-]*$' },
      path: { type: 'string', minLength: 1 },
      compress: { type: 'boolean' },
      ignore_base_model: { type: 'boolean' },
    },
  };
  return { generate, compat, completions, chat, tokenize, registerAdapter };
}

/** Adapter ids accepted by the admin routes (no path separators that could escape, no control characters). */
export const ADAPTER_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._/@:+-]*$/;
