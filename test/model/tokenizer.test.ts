import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateTokenizer, SPECIAL_TOKENS } from '../../src/io/fixtures/generate-tokenizer.js';
import { loadLlamaConfig } from '../../src/model/llama-config.js';
import { engineTokenizerOf, IncrementalDecoder } from '../../src/engine/engine-tokenizer.js';
import { loadTokenizer } from '../../src/model/tokenizer.js';
import { modelDir, tempDir } from './model-helpers.js';

const TEXTS = [
  'Hello, world! How are you today?',
  'The quick brown fox jumps over the lazy dog.',
  '  leading spaces, trailing tabs\t\n and newlines\n\n',
  'Ünïcödé: naïve café, 日本語のテキスト, emoji 🦊🚀 and a ZWJ 👩‍💻.',
  "It's what we're told; 3.14159 + 42 = 45.14159",
  'unusual: qzxj vvkk 0x7fff <not-special>',
];

describe('generated tokenizer through @huggingface/tokenizers', () => {
  it('round-trips text, adds bos, keeps special tokens whole', async () => {
    const dir = await modelDir();
    const config = await loadLlamaConfig(dir);
    const tokenizer = await loadTokenizer(dir, config);
    expect(tokenizer.vocabSize).toBe(512);
    expect(tokenizer.bosTokenId).toBe(config.bosTokenId);
    expect(tokenizer.eosTokenIds).toEqual([...config.eosTokenIds].sort((a, b) => a - b));
    for (const text of TEXTS) {
      const ids = tokenizer.encode(text);
      expect(ids[0]).toBe(tokenizer.bosTokenId);
      expect(ids.every((id) => id >= 0 && id < 512)).toBe(true);
      expect(tokenizer.decode(ids, { skipSpecialTokens: true })).toBe(text);
      expect(tokenizer.decode(tokenizer.encode(text, { addSpecialTokens: false }))).toBe(text);
    }
    // learned merges compress ordinary English
    expect(tokenizer.encode('the assistant answers the question', { addSpecialTokens: false }).length).toBeLessThan(20);
    const withSpecial = tokenizer.encode('<|user|>\nhi<|end|>', { addSpecialTokens: false });
    expect(withSpecial[0]).toBe(tokenizer.tokenToId('<|user|>'));
    expect(withSpecial.at(-1)).toBe(tokenizer.tokenToId('<|end|>'));
    expect(tokenizer.specialIds.has(withSpecial[0]!)).toBe(true);
  });

  it('streams text only once it is complete UTF-8, and the stream equals the full decode', async () => {
    const tokenizer = await loadTokenizer(await modelDir());
    for (const text of TEXTS) {
      const ids = [...tokenizer.encode(text), ...tokenizer.eosTokenIds];
      const stream = tokenizer.createStreamDecoder();
      const pieces = ids.map((id) => stream.push(id));
      pieces.push(stream.flush());
      expect(pieces.join('')).toBe(text);
      expect(stream.text).toBe(text);
      for (const piece of pieces) expect(piece).not.toContain('\uFFFD');
    }
    // a 4-byte emoji is several byte tokens: the first ones emit nothing
    const emoji = tokenizer.encode('🦊', { addSpecialTokens: false });
    expect(emoji.length).toBeGreaterThan(1);
    const stream = tokenizer.createStreamDecoder();
    expect(emoji.map((id) => stream.push(id))).toEqual([...new Array<string>(emoji.length - 1).fill(''), '🦊']);
  });

  it('gives offsets into the input text', async () => {
    const tokenizer = await loadTokenizer(await modelDir());
    const text = 'Hello café 🦊!';
    const tokens = tokenizer.tokenizeWithOffsets(text);
    expect(tokens[0]).toMatchObject({ id: tokenizer.bosTokenId, start: 0, stop: 0, special: true });
    for (const token of tokens.slice(1)) expect(text.slice(token.start, token.stop)).toBe(token.text);
    expect(tokens.slice(1).map((t) => t.text).join('')).toBe(text);
    expect(tokens.map((t) => t.id)).toEqual(tokenizer.encode(text));
  });

  it('renders the chat template and refuses unknown roles', async () => {
    const tokenizer = await loadTokenizer(await modelDir());
    expect(tokenizer.hasChatTemplate).toBe(true);
    const prompt = tokenizer.applyChatTemplate([{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi!' }]);
    expect(prompt).toBe('<|begin_of_text|><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n');
    expect(tokenizer.applyChatTemplate([{ role: 'user', content: 'x' }], { addGenerationPrompt: false })).toBe('<|begin_of_text|><|user|>\nx<|end|>\n');
    const ids = tokenizer.encodeChat([{ role: 'user', content: 'Hi!' }]);
    expect(ids.filter((id) => id === tokenizer.bosTokenId)).toHaveLength(1);
    expect(() => tokenizer.applyChatTemplate([{ role: 'tool', content: 'x' }])).toThrow(expect.objectContaining({ code: 'VALIDATION', message: expect.stringContaining('unsupported chat role: tool') }));
  });

  it('with clean_up_tokenization_spaces (Llama-3 ships it), streamed and per-token texts keep every character; decode cleans up as transformers does', async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson } = generateTokenizer(400);
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|begin_of_text|>', eos_token: '<|end|>', clean_up_tokenization_spaces: true }));
    const tokenizer = await loadTokenizer(dir);
    const text = "Hello , world . Done ? I ' m here , aren 't I ?";
    const ids = tokenizer.encode(text, { addSpecialTokens: false });
    expect(tokenizer.decode(ids)).toBe("Hello, world. Done? I'm here, aren 't I?"); // transformers' decode
    const raw = tokenizer.decode(ids, { cleanUpTokenizationSpaces: false });
    expect(raw).toBe(text);
    const stream = tokenizer.createStreamDecoder();
    const pieces = ids.map((id) => stream.push(id));
    pieces.push(stream.flush());
    expect(pieces.join('')).toBe(text);
    const engineSide = engineTokenizerOf(tokenizer);
    const incremental = new IncrementalDecoder(engineSide);
    expect([...ids.map((id) => incremental.push(id)), incremental.flush()].join('')).toBe(text);
    // /tokenize offsets point into the input
    for (const token of tokenizer.tokenizeWithOffsets(text, { addSpecialTokens: false })) expect(text.slice(token.start, token.stop)).toBe(token.text);
    // a token's own text: " ." stays " ."
    const period = tokenizer.encode(' .', { addSpecialTokens: false });
    expect(period.map((id) => engineSide.decode([id], false)).join('')).toBe(' .');
  });

  it('a Llama-class tokenizer adds bos/eos as add_bos_token/add_eos_token say (transformers rebuilds its post-processor)', async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson } = generateTokenizer(300); // its own post-processor adds bos
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    const bos = 300 - SPECIAL_TOKENS.length;
    const plain = async (config: Record<string, unknown>): Promise<number[]> => {
      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|begin_of_text|>', eos_token: '<|end|>', clean_up_tokenization_spaces: false, ...config }));
      return (await loadTokenizer(dir)).encode('hello world');
    };
    const body = await (async () => {
      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<|begin_of_text|>', eos_token: '<|end|>' }));
      return (await loadTokenizer(dir)).encode('hello world', { addSpecialTokens: false });
    })();
    expect(await plain({ tokenizer_class: 'LlamaTokenizerFast', add_bos_token: false, add_eos_token: true })).toEqual([...body, 299]);
    expect(await plain({ tokenizer_class: 'LlamaTokenizer', add_bos_token: true, add_eos_token: true })).toEqual([bos, ...body, 299]);
    expect(await plain({ tokenizer_class: 'LlamaTokenizerFast' })).toEqual([bos, ...body]); // transformers' defaults
    expect(await plain({ tokenizer_class: 'LlamaTokenizerFast', add_bos_token: null })).toEqual(body); // falsy, as transformers reads it
    // other classes keep tokenizer.json's post-processor, as transformers' PreTrainedTokenizerFast does
    expect(await plain({ tokenizer_class: 'PreTrainedTokenizerFast', add_bos_token: false })).toEqual([bos, ...body]);
    // a flag asking for a token the tokenizer has not: the file's post-processor stays
    expect(await plain({ tokenizer_class: 'LlamaTokenizerFast', add_eos_token: true, eos_token: '<nowhere>' })).toEqual([bos, ...body]);
  });

  it('reads string/object special tokens and a missing chat template', async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson } = generateTokenizer(300);
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: { content: '<|begin_of_text|>' }, eos_token: '<|end|>', clean_up_tokenization_spaces: false }));
    const tokenizer = await loadTokenizer(dir);
    expect(tokenizer.vocabSize).toBe(300);
    expect(tokenizer.bosTokenId).toBe(300 - SPECIAL_TOKENS.length);
    expect(tokenizer.eosTokenIds).toEqual([299]);
    expect(tokenizer.hasChatTemplate).toBe(false);
    expect(() => tokenizer.applyChatTemplate([{ role: 'user', content: 'x' }])).toThrow(/no chat template/);
    await expect(loadTokenizer(join(dir, 'missing'))).rejects.toMatchObject({ code: 'FILE_NOT_FOUND' });
  });

  it('reads chat_template.jinja and special_tokens_map.json as transformers does; refuses a template list with no default', async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson } = generateTokenizer(300);
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    // bos/eos only in special_tokens_map.json; the template only in chat_template.jinja
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ clean_up_tokenization_spaces: false }));
    await writeFile(join(dir, 'special_tokens_map.json'), JSON.stringify({ bos_token: '<|begin_of_text|>', eos_token: { content: '<|end|>' } }));
    await writeFile(join(dir, 'chat_template.jinja'), '{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}');
    const tokenizer = await loadTokenizer(dir);
    expect(tokenizer.bosTokenId).toBe(300 - SPECIAL_TOKENS.length);
    expect(tokenizer.eosTokenIds).toEqual([299]);
    expect(tokenizer.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<|begin_of_text|>[user] hi<|end|>');
    // the file wins over the config's key, as in transformers
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ chat_template: 'config {{ messages[0].content }}' }));
    expect((await loadTokenizer(dir)).applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<|begin_of_text|>[user] hi<|end|>');
    await rm(join(dir, 'chat_template.jinja'));
    expect((await loadTokenizer(dir)).applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('config hi');
    // the context transformers renders with: tools and documents null, every special token
    const guarded = "{% if tools is not none %}TOOLS {{ tools }}{% endif %}{% if documents is not none %}DOCS{% endif %}[{{ unk_token }}|{{ pad_token }}] {{ messages[0].content }}";
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ chat_template: guarded, unk_token: '<unk>', pad_token: { content: '<pad>' } }));
    expect((await loadTokenizer(dir)).applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('[<unk>|<pad>] hi');
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ chat_template: [{ name: 'tool_use', template: 'tools' }, { name: 'rag', template: 'rag' }] }));
    await expect(loadTokenizer(dir)).rejects.toMatchObject({ code: 'MODEL_CONFIG', message: expect.stringMatching(/none is named "default"/) });
  });

  it("tokenBytes gives each token's own bytes, so tokens that split a UTF-8 character join back to the text", async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson, tokenizerConfig } = generateTokenizer(512);
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(tokenizerConfig));
    const tokenizer = await loadTokenizer(dir);
    const text = 'héllo wörld 😀 日本語 – ok';
    const ids = tokenizer.encode(text, { addSpecialTokens: false });
    const split = ids.filter((id) => tokenizer.decode([id]).includes('\uFFFD'));
    expect(split.length).toBeGreaterThan(0); // some token holds part of a character: its text alone is U+FFFD
    expect(Buffer.from(ids.flatMap((id) => tokenizer.tokenBytes(id)))).toEqual(Buffer.from(text, 'utf8'));
    const bos = tokenizer.bosTokenId!;
    expect(tokenizer.tokenBytes(bos)).toEqual([...Buffer.from(tokenizer.decode([bos]), 'utf8')]); // a special token: its text
  });

  it('is deterministic and exactly the asked vocabulary size (SmolLM-135M: 49152)', () => {
    const big = generateTokenizer(49152);
    const model = big.tokenizerJson.model as { vocab: Record<string, number>; merges: unknown[] };
    expect(Object.keys(model.vocab).length + SPECIAL_TOKENS.length).toBe(49152);
    expect(new Set(Object.values(model.vocab)).size).toBe(49152 - SPECIAL_TOKENS.length);
    expect(JSON.stringify(generateTokenizer(512))).toBe(JSON.stringify(generateTokenizer(512)));
  });

  it('an optional tokenizer file that is there but unreadable is an error naming it, not left out (a folder stands in for an unreadable file)', async () => {
    const dir = await tempDir('soppu-tok-');
    const { tokenizerJson } = generateTokenizer(300);
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    await mkdir(join(dir, 'tokenizer_config.json'));
    await expect(loadTokenizer(dir)).rejects.toMatchObject({ code: 'FILE_IO', message: expect.stringContaining(`tokenizer file ${join(dir, 'tokenizer_config.json')} could not be read`) });
    await rm(join(dir, 'tokenizer_config.json'), { recursive: true });
    await expect(loadTokenizer(dir)).resolves.toBeTruthy(); // absent: fine
    await mkdir(join(dir, 'config.json'));
    await expect(loadLlamaConfig(dir)).rejects.toMatchObject({ code: 'FILE_IO' });
  });
});
