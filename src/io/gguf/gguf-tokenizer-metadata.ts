/**
 * GGUF tokenizer metadata (tokenizer.ggml.*) from a Hugging Face byte-level BPE tokenizer.json and
 * tokenizer_config.json, the way convert_hf_to_gguf writes a "gpt2"-model vocabulary.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SoppuError } from '../../errors/soppu-error.js';
import type { GgufValue } from './gguf-writer.js';

/** llama_token_type values. */
const TOKEN_TYPE = { NORMAL: 1, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5 } as const;

type Json = Record<string, unknown>;

async function readJson(file: string, required: boolean): Promise<Json | null> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new SoppuError('FILE_NOT_FOUND', `${file}: cannot read (${(e as Error).message})`, { file }, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new SoppuError('MODEL_CONFIG', `${file}: not valid JSON (${(e as Error).message})`, { file });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new SoppuError('MODEL_CONFIG', `${file}: must be a JSON object`, { file });
  return json as Json;
}

/** A special token given as a string or as {content}. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (value !== null && typeof value === 'object' && typeof (value as Json)['content'] === 'string') return (value as Json)['content'] as string;
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
  const tokenizer = (await readJson(file, true))!;
  const tokenizerConfig = await readJson(join(modelDir, 'tokenizer_config.json'), false);
  const model = tokenizer['model'] as Json | undefined;
  if (!model || model['type'] !== 'BPE') throw new SoppuError('MODEL_CONFIG', `${file}: field "model.type" must be "BPE" (a byte-level BPE); got ${JSON.stringify(model?.['type'])}`, { file, field: 'model.type' });
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
  // GPT-2's split regex, the one the ByteLevel pre-tokenizer uses
  metadata.set('tokenizer.ggml.pre', { type: 'string', value: 'gpt-2' });
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
  metadata.set('tokenizer.ggml.add_bos_token', { type: 'bool', value: tokenizerConfig?.['add_bos_token'] === true });
  metadata.set('tokenizer.ggml.add_eos_token', { type: 'bool', value: tokenizerConfig?.['add_eos_token'] === true });
  const template = tokenizerConfig?.['chat_template'];
  if (typeof template === 'string') metadata.set('tokenizer.chat_template', { type: 'string', value: template });
  return metadata;
}
