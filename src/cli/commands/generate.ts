import type { Command } from 'commander';
import { SoppuError } from '../../errors/soppu-error.js';
import { createEngine, parseLoraDtype } from '../../engine/engine.js';
import { loadLlamaModel } from '../../model/llama-model.js';
import type { GenerateRequest } from '../../engine/engine-types.js';
import { parseInteger } from '../parse-integer.js';

interface GenerateOptions {
  model: string;
  adapter?: string;
  bank?: string;
  adapterId?: string;
  prompt: string;
  maxNewTokens: string;
  temperature?: string;
  topK?: string;
  topP?: string;
  seed?: string;
  ignoreEos?: boolean;
  stop?: string[];
  loraDtype: string;
}

function number(value: string | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  const n = value.trim() === '' ? Number.NaN : Number(value); // Number('') is 0
  if (!Number.isFinite(n)) throw new SoppuError('CONFIG', `--${field} must be a number, got "${value}"`, { field });
  return n;
}

/**
 * `soppu generate`: one completion, greedy unless a temperature is given. The generated text alone
 * goes to stdout; logs and timings go to stderr.
 */
export function register(program: Command): void {
  program
    .command('generate')
    .description('generate a completion for one prompt with the base model, a PEFT adapter or a bank adapter')
    .requiredOption('--model <dir>', 'model directory (config.json, safetensors, tokenizer.json)')
    .option('--adapter <dir>', 'PEFT LoRA adapter directory')
    .option('--bank <dir>', 'adapter bank directory (with --adapter-id)')
    .option('--adapter-id <id>', 'adapter id in the bank')
    .requiredOption('--prompt <text>', 'prompt text')
    .option('--max-new-tokens <n>', 'tokens to generate', '64')
    .option('--temperature <t>', 'sample with this temperature (default: greedy)')
    .option('--top-k <k>', 'sample among the k most likely tokens (with --temperature)')
    .option('--top-p <p>', 'nucleus sampling mass (with --temperature)')
    .option('--seed <n>', 'sampling seed (with --temperature)')
    .option('--ignore-eos', 'keep generating past end-of-sequence')
    .option('--stop <text...>', 'stop sequences')
    .option('--lora-dtype <dtype>', 'adapter factors and cores in memory: auto (the model dtype; a bank\'s adapters in bf16 for an f32 model), f32, bf16 or f16', 'auto')
    .action(async (options: GenerateOptions) => {
      for (const [flag, value] of [['adapter', options.adapter], ['bank', options.bank], ['adapter-id', options.adapterId]] as const) {
        if (value !== undefined && value.trim() === '') throw new SoppuError('CONFIG', `--${flag} is empty`, { field: flag });
      }
      if (options.adapter && (options.bank || options.adapterId)) {
        throw new SoppuError('CONFIG', 'use either --adapter DIR or --bank DIR --adapter-id ID, not both', { field: 'adapter' });
      }
      if (Boolean(options.bank) !== Boolean(options.adapterId)) {
        throw new SoppuError('CONFIG', '--bank and --adapter-id go together', { field: options.bank ? 'adapter-id' : 'bank' });
      }
      // an empty stop would match nowhere and be ignored (the HTTP routes refuse one too)
      if (options.stop?.some((stop) => stop === '')) throw new SoppuError('CONFIG', '--stop takes non-empty sequences, got ""', { field: 'stop' });
      const maxNewTokens = parseInteger(options.maxNewTokens, 'max-new-tokens', 1)!;
      const temperature = number(options.temperature, 'temperature');
      // every sampling flag checked before the model loads
      const sampling = {
        ...(temperature !== undefined ? { temperature, doSample: temperature > 0 } : {}),
        ...(options.topK !== undefined ? { topK: parseInteger(options.topK, 'top-k', 0)! } : {}),
        ...(options.topP !== undefined ? { topP: number(options.topP, 'top-p')! } : {}),
        ...(options.seed !== undefined ? { seed: parseInteger(options.seed, 'seed', 0)! } : {}),
      };
      // (after each value's own check) greedy unless a temperature is given: a sampling flag alone would be ignored (--seed) or sample at 1 (--top-k/p)
      if (temperature === undefined) {
        for (const [flag, value] of [['top-k', options.topK], ['top-p', options.topP], ['seed', options.seed]] as const) {
          if (value !== undefined) throw new SoppuError('CONFIG', `--${flag} is for sampling: give --temperature too (generate is greedy without one)`, { field: flag });
        }
      }
      const loraDtype = parseLoraDtype(options.loraDtype);
      const started = performance.now();
      const model = await loadLlamaModel(options.model);
      const maxTotalTokens = Math.min(4096, model.config.maxPositionEmbeddings);
      const engine = await createEngine({
        modelDir: options.model,
        model,
        ...(options.bank ? { bankDir: options.bank } : {}),
        kvBudgetBytes: 256 * 1024 * 1024,
        adapterBudgetBytes: 1024 * 1024 * 1024,
        maxBatchTokens: 512,
        maxRunningRequests: 1,
        maxInputTokens: maxTotalTokens - 1,
        maxTotalTokens,
        blockSize: 16,
        loraDtype,
      });
      const loaded = performance.now();
      const request: GenerateRequest = {
        prompt: options.prompt,
        maxNewTokens,
        ...(options.adapter ? { adapterId: 'cli-adapter', adapterSource: 'local' as const, adapterPath: options.adapter } : {}),
        ...(options.adapterId ? { adapterId: options.adapterId, adapterSource: 'bank' as const } : {}),
        sampling,
        ...(options.stop ? { stop: options.stop } : {}),
        ...(options.ignoreEos ? { ignoreEos: true } : {}),
      };
      let firstToken = 0;
      for await (const event of engine.generate(request)) {
        if (event.type === 'token') {
          if (firstToken === 0) firstToken = performance.now();
          continue;
        }
        const done = performance.now();
        process.stdout.write(`${event.generatedText}\n`);
        const decodeSeconds = (done - firstToken) / 1000;
        const rate = event.generatedTokens > 1 && decodeSeconds > 0 ? ((event.generatedTokens - 1) / decodeSeconds).toFixed(1) : 'n/a';
        process.stderr.write(
          `soppu generate: kernel ${engine.info.kernel}, load ${(loaded - started).toFixed(0)} ms, prompt ${event.promptTokens} tokens, ` +
            `first token ${(firstToken - loaded).toFixed(0)} ms, ${event.generatedTokens} tokens (${event.finishReason}), decode ${rate} tokens/s` +
            `${event.seed !== null ? `, seed ${event.seed}` : ''}\n`,
        );
      }
      await engine.close();
    });
}
