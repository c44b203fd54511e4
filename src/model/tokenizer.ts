/**
 * The model's tokenizer: tokenizer.json through @huggingface/tokenizers, the chat template of
 * tokenizer_config.json through @huggingface/jinja, bos/eos from the config files, and an incremental
 * decoder for streaming (text is emitted only once it is valid UTF-8).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';
import { SoppuError } from '../errors/soppu-error.js';
import { BYTE_OF_CHAR } from '../io/byte-level.js';
import type { LlamaConfig } from './llama-config.js';

/** One chat message, as OpenAI sends it. */
export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

/** A token with its place in the input text (UTF-16 offsets, [start, stop)). */
export interface TokenWithOffsets {
  readonly id: number;
  readonly text: string;
  readonly start: number;
  readonly stop: number;
  /** True for tokens the post-processor added (e.g. bos); their offsets are empty. */
  readonly special: boolean;
}

type Json = Record<string, unknown>;

/**
 * DIR/chat_template.jinja, or null when there is none: recent transformers save the chat template there,
 * and it wins over tokenizer_config.json's key.
 */
export async function readChatTemplateFile(modelDir: string): Promise<string | null> {
  const file = join(modelDir, 'chat_template.jinja');
  return readFile(file, 'utf8').catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw new SoppuError('FILE_IO', `chat template ${file} could not be read: ${e.message}`, { file }, { cause: e });
  });
}

/**
 * A tokenizer file's JSON object; null for an absent file that is not `required`. A missing file is
 * FILE_NOT_FOUND, one that is there but unreadable FILE_IO, one that is no JSON object MODEL_CONFIG.
 */
export async function readTokenizerJson(file: string, required: boolean): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    const missing = (e as NodeJS.ErrnoException).code === 'ENOENT';
    // an optional file may be absent; one that is there but unreadable is not silently left out
    if (!required && missing) return null;
    throw new SoppuError(missing ? 'FILE_NOT_FOUND' : 'FILE_IO', `tokenizer file ${file} could not be read: ${(e as Error).message}`, { file }, { cause: e });
  }
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not a JSON object');
    return value as Json;
  } catch (e) {
    throw new SoppuError('MODEL_CONFIG', `tokenizer file ${file} is not a valid JSON object: ${(e as Error).message}`, { file }, { cause: e });
  }
}

/** tokenizer_config.json writes special tokens as a string or as an AddedToken object. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as Json).content === 'string') return (value as Json).content as string;
  return null;
}

/** The id of `content` in a tokenizer.json: an added token's, else the model vocabulary's (a map, or Unigram's list). */
function tokenIdIn(tokenizerJson: Json, content: string): number | null {
  const added = Array.isArray(tokenizerJson.added_tokens) ? (tokenizerJson.added_tokens as Json[]).find((t) => t.content === content) : undefined;
  if (added && typeof added.id === 'number') return added.id;
  const vocab = (tokenizerJson.model as Json | undefined)?.vocab;
  if (Array.isArray(vocab)) {
    const index = vocab.findIndex((entry) => Array.isArray(entry) && entry[0] === content);
    return index >= 0 ? index : null;
  }
  const id = vocab && typeof vocab === 'object' ? (vocab as Json)[content] : undefined;
  return typeof id === 'number' ? id : null;
}

/** tokenizer_class values whose transformers tokenizer rebuilds its post-processor from add_bos_token/add_eos_token. */
const FLAG_TEMPLATED_CLASSES = /^(Llama|CodeLlama|Gemma)Tokenizer(Fast)?$/;

/**
 * The post-processor transformers' LlamaTokenizerFast (and CodeLlama's, Gemma's) builds at load from
 * tokenizer_config.json's add_bos_token (default true) and add_eos_token (default false), in place of
 * tokenizer.json's own (`update_post_processor`); null for other classes, or when a token it needs has no id
 * (transformers refuses those; the file's post-processor is kept).
 */
export function flagTemplatedPostProcessor(tokenizerJson: Json, tokenizerConfig: Json): Json | null {
  if (typeof tokenizerConfig.tokenizer_class !== 'string' || !FLAG_TEMPLATED_CLASSES.test(tokenizerConfig.tokenizer_class)) return null;
  // as transformers tests them (`if self.add_bos_token`): absent is its default, null is false
  const addBos = tokenizerConfig.add_bos_token === undefined ? true : Boolean(tokenizerConfig.add_bos_token);
  const addEos = Boolean(tokenizerConfig.add_eos_token);
  const special: Json = {};
  const edge = (name: 'bos_token' | 'eos_token', add: boolean): string | null | undefined => {
    if (!add) return null;
    const content = tokenContent(tokenizerConfig[name]);
    const id = content === null ? null : tokenIdIn(tokenizerJson, content);
    if (content === null || id === null) return undefined;
    special[content] = { id: content, ids: [id], tokens: [content] };
    return content;
  };
  const bos = edge('bos_token', addBos);
  const eos = edge('eos_token', addEos);
  if (bos === undefined || eos === undefined) return null;
  const sequence = (typeId: number): Json[] => [
    ...(bos !== null ? [{ SpecialToken: { id: bos, type_id: typeId } }] : []),
    { Sequence: { id: typeId === 0 ? 'A' : 'B', type_id: typeId } },
    ...(eos !== null ? [{ SpecialToken: { id: eos, type_id: typeId } }] : []),
  ];
  return { type: 'TemplateProcessing', single: sequence(0), pair: [...sequence(0), ...sequence(1)], special_tokens: special };
}

/** The byte scheme of a tokenizer.json: its decoder (or a Sequence of decoders) names it. */
function byteSchemeOf(tokenizerJson: Json): 'byte-level' | 'sentencepiece' | 'text' {
  const decoder = tokenizerJson.decoder as Json | null | undefined;
  const types = decoder ? [decoder.type, ...(Array.isArray(decoder.decoders) ? (decoder.decoders as Json[]).map((d) => d.type) : [])] : [];
  if (types.includes('ByteLevel')) return 'byte-level';
  if (types.includes('ByteFallback') || types.includes('Metaspace')) return 'sentencepiece';
  return 'text';
}

/** Tokenizer + chat template of one model folder. */
export class ModelTokenizer {
  /** Vocabulary size including added tokens. */
  readonly vocabSize: number;
  readonly bosToken: string | null;
  readonly bosTokenId: number | null;
  readonly eosToken: string | null;
  /** Every id that ends generation (config.json, generation_config.json and tokenizer_config.json, merged). */
  readonly eosTokenIds: readonly number[];
  /** Ids of special (added) tokens. */
  readonly specialIds: ReadonlySet<number>;
  /** The most characters one token's text holds: a text longer than n of these has more than n tokens. */
  readonly maxTokenChars: number;
  private readonly template: Template | null;
  /** How a vocabulary entry holds its bytes: byte-level (GPT-2's byte → character table), SentencePiece (▁, <0xNN>), or neither. */
  private readonly byteScheme: 'byte-level' | 'sentencepiece' | 'text';
  /** unk_token, pad_token, sep_token, cls_token, mask_token as tokenizer_config.json names them (for templates). */
  private readonly specialTokenContext: Record<string, string>;

  private constructor(
    private readonly tokenizer: Tokenizer,
    tokenizerJson: Json,
    private readonly tokenizerConfig: Json,
    eosIds: readonly number[],
    bosIdFromConfig: number | null,
    file: string,
  ) {
    const vocabulary = tokenizer.get_vocab(true);
    this.vocabSize = vocabulary.size;
    // a token's text (byte-level or ▁ form) is at least as long as what it decodes to
    let longest = 1;
    for (const token of vocabulary.keys()) longest = Math.max(longest, token.length);
    this.maxTokenChars = longest;
    this.byteScheme = byteSchemeOf(tokenizerJson);
    this.specialTokenContext = {};
    for (const name of ['unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(tokenizerConfig[name]);
      if (content !== null) this.specialTokenContext[name] = content;
    }
    this.bosToken = tokenContent(tokenizerConfig.bos_token);
    this.eosToken = tokenContent(tokenizerConfig.eos_token);
    this.bosTokenId = (this.bosToken !== null ? tokenizer.token_to_id(this.bosToken) : undefined) ?? bosIdFromConfig;
    const eos = new Set(eosIds);
    const eosFromTokenizer = this.eosToken !== null ? tokenizer.token_to_id(this.eosToken) : undefined;
    if (eosFromTokenizer !== undefined) eos.add(eosFromTokenizer);
    this.eosTokenIds = [...eos].sort((a, b) => a - b);
    this.specialIds = new Set([...tokenizer.get_added_tokens_decoder().entries()].filter(([, token]) => token.special).map(([id]) => id));
    let source = tokenizerConfig.chat_template;
    if (Array.isArray(source)) {
      // [{name, template}]: the one named "default" (as transformers, which refuses a list without one)
      const named = source as { name?: unknown; template?: unknown }[];
      const chosen = named.find((t) => t.name === 'default');
      if (!chosen) {
        throw new SoppuError('MODEL_CONFIG', `tokenizer config ${file}: field "chat_template" lists ${named.length} named templates and none is named "default"`, { file, field: 'chat_template' });
      }
      source = chosen.template;
    }
    if (source !== undefined && source !== null && typeof source !== 'string') {
      throw new SoppuError('MODEL_CONFIG', `tokenizer config ${file}: field "chat_template" must be a string or a list of {name, template}`, { file, field: 'chat_template' });
    }
    try {
      this.template = typeof source === 'string' ? new Template(source) : null;
    } catch (e) {
      throw new SoppuError('MODEL_CONFIG', `tokenizer config ${file}: field "chat_template" does not parse: ${(e as Error).message}`, { file, field: 'chat_template' }, { cause: e });
    }
  }

  /**
   * Load tokenizer.json and tokenizer_config.json of `modelDir` (and generation_config.json's eos
   * ids when present). `config` adds config.json's bos/eos ids.
   */
  static async load(modelDir: string, config?: LlamaConfig): Promise<ModelTokenizer> {
    const tokenizerFile = join(modelDir, 'tokenizer.json');
    const configFile = join(modelDir, 'tokenizer_config.json');
    const tokenizerJson = (await readTokenizerJson(tokenizerFile, true))!;
    // special_tokens_map.json fills what tokenizer_config.json leaves out (bos/eos tokens), as transformers merges it
    const specialTokensMap = (await readTokenizerJson(join(modelDir, 'special_tokens_map.json'), false)) ?? {};
    const tokenizerConfig: Json = { ...specialTokensMap, ...(await readTokenizerJson(configFile, false)) };
    const templateText = await readChatTemplateFile(modelDir);
    if (templateText !== null) tokenizerConfig.chat_template = templateText;
    const generationConfig = await readTokenizerJson(join(modelDir, 'generation_config.json'), false);
    // as transformers loads a Llama-class tokenizer: its add_bos_token/add_eos_token decide the special tokens
    const postProcessor = flagTemplatedPostProcessor(tokenizerJson, tokenizerConfig);
    let tokenizer: Tokenizer;
    try {
      tokenizer = new Tokenizer(postProcessor ? { ...tokenizerJson, post_processor: postProcessor } : tokenizerJson, tokenizerConfig);
    } catch (e) {
      throw new SoppuError('MODEL_CONFIG', `tokenizer file ${tokenizerFile} is not supported: ${(e as Error).message}`, { file: tokenizerFile }, { cause: e });
    }
    const eosIds: number[] = [...(config?.eosTokenIds ?? [])];
    const generationEos = generationConfig?.eos_token_id;
    for (const id of Array.isArray(generationEos) ? generationEos : [generationEos]) {
      if (typeof id === 'number' && Number.isSafeInteger(id) && id >= 0) eosIds.push(id);
    }
    return new ModelTokenizer(tokenizer, tokenizerJson, tokenizerConfig, eosIds, config?.bosTokenId ?? null, configFile);
  }

  /** Token ids of `text`; the post-processor's special tokens (e.g. bos) are added unless told not to. */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /**
   * Text of `ids`. Special tokens are kept unless `skipSpecialTokens`. `cleanUpTokenizationSpaces` (default:
   * tokenizer_config.json's, true when absent, as transformers' decode) rewrites " ." as ".", " 's" as "'s" and
   * the like. Streaming and per-token texts pass false: a rewrite inside the decoded prefix shifts the text a
   * window's growth is cut from, and characters were lost (vLLM's incremental detokenizer never cleans up).
   */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean; cleanUpTokenizationSpaces?: boolean } = {}): string {
    if (ids.length === 0) return '';
    return this.tokenizer.decode([...ids], {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      ...(options.cleanUpTokenizationSpaces !== undefined ? { clean_up_tokenization_spaces: options.cleanUpTokenizationSpaces } : {}),
    });
  }

  /** One token's own text (or a window of them, for streaming): decoded without the spaces clean-up. */
  private rawText(ids: readonly number[], skipSpecialTokens = false): string {
    return this.decode(ids, { skipSpecialTokens, cleanUpTokenizationSpaces: false });
  }

  /** True for special (added) tokens such as bos, eos and chat role markers. */
  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /**
   * The bytes of one token's text, also for a token that holds part of a UTF-8 character (its decoded text
   * is then U+FFFD): a byte-level entry through GPT-2's byte table, a SentencePiece <0xNN> entry as its byte,
   * else the UTF-8 of its decoding. OpenAI's logprobs `bytes` carry them so a client can join such tokens.
   */
  tokenBytes(id: number): number[] {
    const entry = this.tokenizer.id_to_token(id);
    if (entry !== undefined && !this.specialIds.has(id)) {
      if (this.byteScheme === 'byte-level') {
        const bytes: number[] = [];
        for (const ch of entry) {
          const byte = BYTE_OF_CHAR.get(ch);
          if (byte === undefined) return [...Buffer.from(this.rawText([id]), 'utf8')]; // an added token's plain text
          bytes.push(byte);
        }
        return bytes;
      }
      if (this.byteScheme === 'sentencepiece') {
        const fallback = /^<0x([0-9A-Fa-f]{2})>$/.exec(entry);
        if (fallback) return [Number.parseInt(fallback[1]!, 16)];
        return [...Buffer.from(entry.replace(/\u2581/g, ' '), 'utf8')];
      }
    }
    return [...Buffer.from(this.rawText([id]), 'utf8')];
  }

  /** The token string of one id (vocabulary form, e.g. "Ġthe"), or undefined. */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** The id of a token string, or undefined. */
  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  /**
   * Tokens of `text` with their [start, stop) offsets in `text` (UTF-16 code units), for /tokenize.
   * A token that ends inside a multi-byte character gets an empty range; the token completing the
   * character covers it.
   */
  tokenizeWithOffsets(text: string, options: { addSpecialTokens?: boolean } = {}): TokenWithOffsets[] {
    const core = this.encode(text, { addSpecialTokens: false });
    const full = (options.addSpecialTokens ?? true) ? this.encode(text, { addSpecialTokens: true }) : core;
    // the post-processor only adds tokens around the text's own tokens
    let prefix = 0;
    while (prefix + core.length <= full.length && !core.every((id, i) => full[prefix + i] === id)) prefix++;
    if (prefix + core.length > full.length) prefix = 0;
    const result: TokenWithOffsets[] = [];
    const added = (id: number, at: number): TokenWithOffsets => ({ id, text: this.rawText([id]), start: at, stop: at, special: true });
    for (let i = 0; i < prefix; i++) result.push(added(full[i]!, 0));
    const decoder = this.createStreamDecoder({ skipSpecialTokens: false });
    let position = 0;
    for (const id of core) {
      const piece = decoder.push(id);
      result.push({ id, text: piece, start: position, stop: position + piece.length, special: false });
      position += piece.length;
    }
    for (let i = prefix + core.length; i < full.length; i++) result.push(added(full[i]!, position));
    return result;
  }

  /** True when tokenizer_config.json has a chat template. */
  get hasChatTemplate(): boolean {
    return this.template !== null;
  }

  /** Render the chat template (a VALIDATION error when the template refuses the messages). */
  applyChatTemplate(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): string {
    if (!this.template) throw new SoppuError('VALIDATION', 'this model has no chat template (tokenizer_config.json has no "chat_template")', { field: 'messages' });
    try {
      // the context transformers gives: tools and documents null when absent, and the special tokens
      return this.template.render({
        ...this.specialTokenContext,
        messages: messages.map((m) => ({ role: m.role, content: m.content })),
        tools: null,
        documents: null,
        add_generation_prompt: options.addGenerationPrompt ?? true,
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
      });
    } catch (e) {
      throw new SoppuError('VALIDATION', `chat template refused the messages: ${(e as Error).message}`, { field: 'messages' }, { cause: e });
    }
  }

  /** Chat messages → prompt token ids (the template supplies bos itself, so none is added). */
  encodeChat(messages: readonly ChatMessage[], options: { addGenerationPrompt?: boolean } = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  /** An incremental decoder for streaming one sequence (special tokens skipped by default). */
  createStreamDecoder(options: { skipSpecialTokens?: boolean } = {}): StreamDecoder {
    const skipSpecialTokens = options.skipSpecialTokens ?? true;
    return new StreamDecoder((ids) => this.rawText(ids, skipSpecialTokens));
  }
}

/**
 * Streaming detokenizer (the TGI scheme, as its decode_token): decodes a short window of recent tokens and emits
 * only the text that is new and complete (no trailing U+FFFD from a partial UTF-8 sequence). The window keeps
 * the tokenizer's context-dependent spacing (e.g. SentencePiece's leading-space rule) right.
 */
export class StreamDecoder {
  private readonly ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;
  /** All text emitted so far. */
  text = '';

  /**
   * `decode`: the text of a window of ids, without the spaces clean-up (a rewrite inside the window shifts the
   * text its growth is cut from). `context`: tokens before the first one pushed (a prompt's last ones), emitted
   * never: the first token is decoded after them, so a decoder that strips a leading space at the start of a text
   * (SentencePiece's `Strip`) keeps the one before a word that continues the prompt. A context whose text ends
   * inside a UTF-8 character is not used (its U+FFFD would shift the first token's text).
   */
  constructor(private readonly decode: (ids: readonly number[]) => string, context: readonly number[] = []) {
    if (context.length > 0 && !decode(context).endsWith('\uFFFD')) {
      this.ids.push(...context);
      this.readOffset = context.length;
    }
  }

  /** Add one token; returns the newly completed text ('' while a character is incomplete). */
  push(id: number): string {
    this.ids.push(id);
    return this.pending(false);
  }

  /** Text still held back at the end of the sequence (an incomplete character comes out as U+FFFD). */
  flush(): string {
    return this.pending(true);
  }

  private pending(force: boolean): string {
    const prefix = this.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.decode(this.ids.slice(this.prefixOffset));
    if (full.length > prefix.length && (force || !full.endsWith('\uFFFD'))) {
      const delta = full.slice(prefix.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      this.text += delta;
      return delta;
    }
    return '';
  }
}

/** Load the tokenizer of `modelDir` (see ModelTokenizer.load). */
export function loadTokenizer(modelDir: string, config?: LlamaConfig): Promise<ModelTokenizer> {
  return ModelTokenizer.load(modelDir, config);
}
