/**
 * What the engine needs from a tokenizer. The model's tokenizer loader is adapted to this in
 * engine.ts; tests pass small in-memory implementations.
 */
import { StreamDecoder, type ModelTokenizer } from '../model/tokenizer.js';

export interface EngineTokenizer {
  /** Token ids of `text`; BOS etc. added when `addSpecialTokens`. */
  encode(text: string, addSpecialTokens: boolean): number[];
  /** Tokens of `text` with their [start, stop) offsets in it (for /tokenize). */
  tokenizeWithOffsets(text: string, addSpecialTokens: boolean): { id: number; text: string; start: number; stop: number }[];
  /**
   * Text of `ids` as the tokens spell it; special tokens dropped when `skipSpecialTokens`. No clean-up of spaces
   * (" ." stays " ."): streamed text is cut from the growth of such decodes, which a rewrite would shift.
   */
  decode(ids: readonly number[], skipSpecialTokens: boolean): string;
  isSpecial(id: number): boolean;
  /** The bytes of one token's text (a part of a UTF-8 character included), when the tokenizer knows them. */
  tokenBytes?(id: number): number[];
  /**
   * End-of-sequence ids beyond config.json's: generation_config.json and tokenizer_config.json list an
   * instruct model's end-of-turn id there (Llama-3's <|eot_id|>, Qwen2's <|im_end|>).
   */
  readonly eosTokenIds?: readonly number[];
  /** The most characters one token's text holds (bounds a text's token count before tokenizing it). */
  readonly maxTokenChars?: number;
  /** Chat messages → prompt text through the chat template. */
  applyChatTemplate(messages: readonly { role: string; content: string }[], addGenerationPrompt: boolean): string;
}

/** The model layer's tokenizer seen through this interface. */
export function engineTokenizerOf(tokenizer: ModelTokenizer): EngineTokenizer {
  return {
    encode: (text, addSpecialTokens) => tokenizer.encode(text, { addSpecialTokens }),
    tokenizeWithOffsets: (text, addSpecialTokens) =>
      tokenizer.tokenizeWithOffsets(text, { addSpecialTokens }).map((t) => ({ id: t.id, text: t.text, start: t.start, stop: t.stop })),
    decode: (ids, skipSpecialTokens) => tokenizer.decode(ids, { skipSpecialTokens, cleanUpTokenizationSpaces: false }),
    isSpecial: (id) => tokenizer.isSpecial(id),
    tokenBytes: (id) => tokenizer.tokenBytes(id),
    eosTokenIds: tokenizer.eosTokenIds,
    maxTokenChars: tokenizer.maxTokenChars,
    applyChatTemplate: (messages, addGenerationPrompt) => tokenizer.applyChatTemplate(messages, { addGenerationPrompt }),
  };
}

/** Prompt tokens an IncrementalDecoder decodes the first generated token after (as TGI's prefix offset). */
export const DECODER_CONTEXT_TOKENS = 5;

/** A StreamDecoder over an engine tokenizer's text with special tokens skipped (`context`: the prompt's last tokens). */
export class IncrementalDecoder extends StreamDecoder {
  constructor(tokenizer: EngineTokenizer, context: readonly number[] = []) {
    super((ids) => tokenizer.decode(ids, true), context);
  }
}
