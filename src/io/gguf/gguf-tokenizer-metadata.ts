/**
 * GGUF tokenizer metadata (tokenizer.ggml.*) from a Hugging Face byte-level BPE tokenizer.json and
 * tokenizer_config.json, the way convert_hf_to_gguf writes a "gpt2"-model vocabulary.
 */
import { join } from 'node:path';
import { SoppuError } from '../../errors/soppu-error.js';
import { readChatTemplateFile, readTokenizerJson } from '../../model/tokenizer.js';
import type { GgufValue } from './gguf-writer.js';

/** llama_token_type values. */
const TOKEN_TYPE = { NORMAL: 1, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5 } as const;

type Json = Record<string, unknown>;

/** A special token given as a string or as {content}. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (value !== null && typeof value === 'object' && typeof (value as Json)['content'] === 'string') return (value as Json)['content'] as string;
  return null;
}

/** The Llama-3 split regex (convert_hf_to_gguf's "llama-bpe" pre-tokenizer). */
const LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/**
 * llama.cpp's name for the pre-tokenizer of a byte-level tokenizer.json (tokenizer.ggml.pre), as
 * convert_hf_to_gguf identifies it: GPT-2's ByteLevel split, SmolLM's digits then ByteLevel, Llama 3's
 * regex split. Anything else, or a tokenizer that is not byte-level (SentencePiece-style byte fallback,
 * a Metaspace pre-tokenizer), is refused: llama.cpp would split text differently from the model's tokenizer.
 */
function preTokenizerName(tokenizer: Json, model: Json, file: string): string {
  const refuse = (why: string): never => {
    throw new SoppuError('MODEL_CONFIG', `${file}: ${why}; soppu writes GGUF for byte-level BPE tokenizers only (llama.cpp's convert_hf_to_gguf.py handles the others)`, { file, field: 'pre_tokenizer' });
  };
  if (model['byte_fallback'] === true) refuse('the BPE model uses byte_fallback (a SentencePiece-style vocabulary)');
  const decoder = tokenizer['decoder'] as Json | null | undefined;
  if (!decoder || decoder['type'] !== 'ByteLevel') refuse(`its decoder is ${JSON.stringify(decoder?.['type'] ?? null)}, not ByteLevel`);
  // llama.cpp's named pre-tokenizers apply no normalizer and add no prefix space: a tokenizer that does either
  // splits text its own way (convert_hf_to_gguf, hashing real output, would not recognise it)
  const normalizer = tokenizer['normalizer'] as Json | null | undefined;
  if (normalizer !== null && normalizer !== undefined) refuse(`it has a normalizer (${JSON.stringify(normalizer['type'] ?? null)}), which llama.cpp's byte-level pre-tokenizers do not apply`);
  const pre = tokenizer['pre_tokenizer'] as Json | null | undefined;
  const steps = pre?.['type'] === 'Sequence' && Array.isArray(pre['pretokenizers']) ? (pre['pretokenizers'] as Json[]) : pre ? [pre] : [];
  if (steps.some((step) => step['type'] === 'ByteLevel' && step['add_prefix_space'] === true)) refuse('its ByteLevel pre-tokenizer adds a prefix space, which llama.cpp\'s do not');
  const [first, second] = steps;
  if (steps.length === 1 && first?.['type'] === 'ByteLevel' && first['use_regex'] !== false) return 'gpt-2';
  if (steps.length === 2 && first?.['type'] === 'Digits' && first['individual_digits'] === true && second?.['type'] === 'ByteLevel' && second['use_regex'] !== false) return 'smollm';
  const pattern = (first?.['pattern'] as Json | undefined)?.['Regex'];
  if (steps.length === 2 && first?.['type'] === 'Split' && pattern === LLAMA3_SPLIT && second?.['type'] === 'ByteLevel' && second['use_regex'] === false) return 'llama-bpe';
  return refuse(`its pre-tokenizer (${steps.map((s) => String(s['type'])).join(' + ') || 'none'}) is not one soppu can name for llama.cpp (GPT-2's ByteLevel, SmolLM's Digits + ByteLevel, Llama 3's split)`);
}

/** Whether the tokenizer adds BOS: the config's add_bos_token, else its post-processor's template; null when unknown. */
function addsBos(tokenizer: Json, tokenizerConfig: Json | null): boolean | null {
  const configured = tokenizerConfig?.['add_bos_token'];
  if (typeof configured === 'boolean') return configured;
  const post = tokenizer['post_processor'] as Json | null | undefined;
  const processors = post?.['type'] === 'Sequence' && Array.isArray(post['processors']) ? (post['processors'] as Json[]) : post ? [post] : [];
  const template = processors.find((p) => p['type'] === 'TemplateProcessing');
  if (template && Array.isArray(template['single'])) return (template['single'] as Json[])[0]?.['SpecialToken'] !== undefined;
  if (processors.every((p) => p['type'] === 'ByteLevel')) return false;
  return null;
}

export interface TokenizerIds {
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
}

/**
 * Reads DIR/tokenizer.json (+ tokenizer_config.json when present) into tokenizer.ggml.* entries.
 * `vocabSize` is the model's embedding rows: missing ids are filled with "[PAD<id>]" unused tokens.
 */
export async function ggufTokenizerMetadata(modelDir: string, vocabSize: number, ids: TokenizerIds): Promise<Map<string, GgufValue>> {
  const file = join(modelDir, 'tokenizer.json');
  const tokenizer = (await readTokenizerJson(file, true))!;
  // special_tokens_map.json fills what tokenizer_config.json leaves out, as transformers merges them
  const specialTokensMap = await readTokenizerJson(join(modelDir, 'special_tokens_map.json'), false);
  const configOnly = await readTokenizerJson(join(modelDir, 'tokenizer_config.json'), false);
  const tokenizerConfig: Json | null = configOnly || specialTokensMap ? { ...specialTokensMap, ...configOnly } : null;
  const model = tokenizer['model'] as Json | undefined;
  if (!model || model['type'] !== 'BPE') throw new SoppuError('MODEL_CONFIG', `${file}: field "model.type" must be "BPE" (a byte-level BPE); got ${JSON.stringify(model?.['type'])}`, { file, field: 'model.type' });
  const pre = preTokenizerName(tokenizer, model, file);
  const vocab = model['vocab'];
  if (vocab === null || typeof vocab !== 'object' || Array.isArray(vocab)) throw new SoppuError('MODEL_CONFIG', `${file}: field "model.vocab" must be an object`, { file, field: 'model.vocab' });

  const tokens: (string | undefined)[] = new Array<string | undefined>(vocabSize);
  const types = new Int32Array(vocabSize).fill(TOKEN_TYPE.NORMAL);
  const place = (content: string, id: unknown, field: string): void => {
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0 || id >= vocabSize) {
      throw new SoppuError('MODEL_CONFIG', `${file}: ${field} "${content}" has id ${JSON.stringify(id)} outside the model vocabulary [0, ${vocabSize})`, { file, field, limit: vocabSize });
    }
    tokens[id] = content;
  };
  for (const [content, id] of Object.entries(vocab as Json)) place(content, id, 'model.vocab');
  const added = tokenizer['added_tokens'];
  if (Array.isArray(added)) {
    for (const entry of added as Json[]) {
      const content = entry['content'];
      if (typeof content !== 'string') throw new SoppuError('MODEL_CONFIG', `${file}: added_tokens entry without a string "content"`, { file, field: 'added_tokens' });
      place(content, entry['id'], 'added_tokens');
      types[entry['id'] as number] = entry['special'] === true ? TOKEN_TYPE.CONTROL : TOKEN_TYPE.USER_DEFINED;
    }
  }
  for (let id = 0; id < vocabSize; id++) {
    if (tokens[id] === undefined) {
      tokens[id] = `[PAD${id}]`;
      types[id] = TOKEN_TYPE.UNUSED;
    }
  }

  const rawMerges = model['merges'];
  if (!Array.isArray(rawMerges)) throw new SoppuError('MODEL_CONFIG', `${file}: field "model.merges" must be an array`, { file, field: 'model.merges' });
  const merges = rawMerges.map((merge: unknown, i) => {
    if (typeof merge === 'string') return merge;
    if (Array.isArray(merge) && merge.length === 2 && typeof merge[0] === 'string' && typeof merge[1] === 'string') return `${merge[0]} ${merge[1]}`;
    throw new SoppuError('MODEL_CONFIG', `${file}: model.merges[${i}] must be "a b" or ["a", "b"]`, { file, field: `model.merges[${i}]` });
  });

  const metadata = new Map<string, GgufValue>();
  metadata.set('tokenizer.ggml.model', { type: 'string', value: 'gpt2' });
  metadata.set('tokenizer.ggml.pre', { type: 'string', value: pre });
  metadata.set('tokenizer.ggml.tokens', { type: 'array', elementType: 'string', value: tokens as string[] });
  metadata.set('tokenizer.ggml.token_type', { type: 'array', elementType: 'int32', value: types });
  metadata.set('tokenizer.ggml.merges', { type: 'array', elementType: 'string', value: merges });

  const idOf = (name: string): number | null => {
    const content = tokenContent(tokenizerConfig?.[name]);
    if (content === null) return null;
    const index = tokens.indexOf(content);
    return index >= 0 ? index : null;
  };
  const bos = ids.bosTokenId ?? idOf('bos_token');
  const eos = ids.eosTokenIds[0] ?? idOf('eos_token');
  if (bos !== null) metadata.set('tokenizer.ggml.bos_token_id', { type: 'uint32', value: bos });
  if (eos !== null) metadata.set('tokenizer.ggml.eos_token_id', { type: 'uint32', value: eos });
  // a second end id (end of turn) stops generation in llama.cpp too
  const eot = ids.eosTokenIds[1];
  if (eot !== undefined) metadata.set('tokenizer.ggml.eot_token_id', { type: 'uint32', value: eot });
  const pad = idOf('pad_token');
  if (pad !== null) metadata.set('tokenizer.ggml.padding_token_id', { type: 'uint32', value: pad });
  // written only when known (llama.cpp then uses its default for the vocabulary type)
  const bosAdded = addsBos(tokenizer, tokenizerConfig);
  if (bosAdded !== null) metadata.set('tokenizer.ggml.add_bos_token', { type: 'bool', value: bosAdded });
  metadata.set('tokenizer.ggml.add_eos_token', { type: 'bool', value: tokenizerConfig?.['add_eos_token'] === true });
  // chat_template.jinja (recent save_pretrained) wins over the config's key; a list names its "default"
  let template = (await readChatTemplateFile(modelDir)) ?? tokenizerConfig?.['chat_template'];
  if (Array.isArray(template)) template = (template as Json[]).find((t) => t['name'] === 'default')?.['template'];
  if (typeof template === 'string') metadata.set('tokenizer.chat_template', { type: 'string', value: template });
  return metadata;
}
