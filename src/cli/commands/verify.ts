import type { Command } from 'commander';
import { openBank, type Bank } from '../../compress/bank-reader.js';
import { SoppuError } from '../../errors/soppu-error.js';
import { loadAdapterArguments } from '../../compress/bank-source.js';
import { verifyBank, type ModelCheck, type ModelCheckResult } from '../../compress/verify-bank.js';
import { createEngine, parseLoraDtype } from '../../engine/engine.js';
import type { Engine, GenerateEvent } from '../../engine/engine-types.js';
import { argmax } from '../../engine/sampler.js';
import type { LoraAdapter } from '../../io/lora-types.js';
import { loadLlamaModel } from '../../model/llama-model.js';
import { parseInteger } from '../parse-integer.js';
import { parseError } from './compress.js';
import { jsonText } from '../../io/snake-case-keys.js';

function formatError(e: number): string {
  return Number.isFinite(e) ? e.toFixed(4) : 'inf';
}

/** Fixed prompts for the model check (deterministic: greedy decoding). */
const CHECK_PROMPTS = ['The quick brown fox', 'Hello, how are you today?', 'Each user may bring their own adapter'];

async function run(engine: Engine, request: Parameters<Engine['generate']>[0])
  : Promise<{ tokens: number[]; distributions: readonly Float32Array[] }> {
  const tokens: number[] = [];
  let distributions: readonly Float32Array[] = [];
  for await (const event of engine.generate(request) as AsyncIterable<GenerateEvent>) {
    if (event.type === 'token') tokens.push(event.token.id);
    else distributions = event.prefillDistributions ?? [];
  }
  return { tokens, distributions };
}

/** KL(p ‖ q) of two log-probability vectors. */
function klDivergence(logP: Float32Array, logQ: Float32Array): number {
  let sum = 0;
  for (let i = 0; i < logP.length; i++) {
    const p = Math.exp(logP[i]!);
    if (p > 0) sum += p * (logP[i]! - logQ[i]!);
  }
  return Math.max(0, sum);
}

/**
 * The model check behind `verify --model`: the original adapter (served raw from its directory)
 * continues fixed prompts greedily; then the prompt plus that continuation is scored in one
 * teacher-forced prefill by the original and by the bank's version, and their next-token
 * distributions are compared at every continuation position.
 */
export function engineModelCheck(engine: Engine, newTokens: number): ModelCheck {
  return async (_bank: Bank, id: string, source: LoraAdapter | null): Promise<ModelCheckResult> => {
    if (!source) {
      return { tokens: 0, meanKl: Number.NaN, maxKl: Number.NaN, top1Agreement: Number.NaN, meanLogprobGap: Number.NaN, maxLogprobGap: Number.NaN };
    }
    const original = { adapterId: `verify-source:${id}`, adapterSource: 'local', adapterPath: source.source } as const;
    const fromBank = { adapterId: id, adapterSource: 'bank' } as const;
    let count = 0, klSum = 0, klMax = 0, gapSum = 0, gapMax = 0, agree = 0;
    for (const text of CHECK_PROMPTS) {
      const prompt = engine.tokenize(text).ids;
      const continuation = (await run(engine, { prompt, maxNewTokens: newTokens, ignoreEos: true, ...original })).tokens;
      const scored = { prompt: [...prompt, ...continuation], maxNewTokens: 1, ignoreEos: true, prefillDetails: true, prefillDistributions: true } as const;
      const p = (await run(engine, { ...scored, ...original })).distributions;
      const q = (await run(engine, { ...scored, ...fromBank })).distributions;
      // the distribution after position prompt.length − 1 + i predicts continuation token i
      for (let i = 0; i < continuation.length; i++) {
        const logP = p[prompt.length - 1 + i];
        const logQ = q[prompt.length - 1 + i];
        if (!logP || !logQ) throw new SoppuError('INTERNAL', `verify --model: no distribution for position ${prompt.length - 1 + i}`);
        const kl = klDivergence(logP, logQ);
        klSum += kl;
        klMax = Math.max(klMax, kl);
        const token = continuation[i]!;
        // a magnitude: a signed mean let the bank's over- and under-estimates cancel
        const gap = Math.abs(logP[token]! - logQ[token]!);
        gapSum += gap;
        gapMax = Math.max(gapMax, gap);
        if (argmax(logQ) === argmax(logP)) agree++;
        count++;
      }
    }
    const mean = (sum: number): number => (count ? sum / count : 0);
    return { tokens: count, meanKl: mean(klSum), maxKl: klMax, top1Agreement: count ? agree / count : 1, meanLogprobGap: mean(gapSum), maxLogprobGap: gapMax };
  };
}

interface VerifyCliOptions {
  adapters?: string[];
  maxError?: string;
  json?: boolean;
  model?: string;
  loraDtype?: string;
  tokens: string;
}

/** `soppu verify bank/ [--adapters dirs...] [--max-error e] [--model dir [--lora-dtype d]]`; exit code 1 when any adapter is over budget or a file is bad. */
export function register(program: Command): void {
  program
    .command('verify')
    .description('check a bank: checksums of every file, and per adapter and slot the relative weight error (against the original adapters when given, paired by id; else the recorded errors), worst first. Exit code 1 when an adapter exceeds the budget or a file is corrupt')
    .argument('<bank>', 'bank directory')
    .option('--adapters <dirs...>', 'original adapter directories (id = directory name, or id=dir)')
    .option('--max-error <e>', 'error budget for every adapter (default: the bank\'s, or the one bank add --max-error stored an adapter under)')
    .option('--model <dir>', 'also compare next-token distributions, original vs bank, teacher-forced on the original\'s greedy continuation of fixed prompts: KL(original‖bank), top-1 agreement, |logprob gap| (needs --adapters)')
    .option('--tokens <n>', 'tokens generated per prompt by the model check', '16')
    .option('--lora-dtype <dtype>', 'with --model: adapters held as serve --lora-dtype holds them: auto (originals in the model dtype; the bank in the model dtype, bf16 for an f32 model), f32, bf16 or f16')
    .option('--json', 'print JSON')
    .action(async (dir: string, options: VerifyCliOptions) => {
      const loraDtype = options.loraDtype === undefined ? 'auto' : parseLoraDtype(options.loraDtype);
      if (options.loraDtype !== undefined && !options.model) throw new SoppuError('CONFIG', '--lora-dtype sets how the model check holds adapters: give --model', { field: 'lora-dtype' });
      const bank = await openBank(dir);
      const sources = new Map((await loadAdapterArguments(options.adapters ?? [])).map(({ id, adapter }) => [id, adapter]));
      const maxError = parseError(options.maxError, 'max-error');
      let engine: Engine | null = null;
      const tokens = parseInteger(options.tokens, 'tokens', 1, 512)!; // checked whether or not --model uses it
      if (options.model && sources.size === 0) throw new SoppuError('CONFIG', '--model compares the originals with the bank: give them with --adapters', { field: 'model' });
      if (options.model) {
        const model = await loadLlamaModel(options.model);
        const maxTotalTokens = Math.min(1024, model.config.maxPositionEmbeddings);
        engine = await createEngine({
          modelDir: options.model, model, bank, kvBudgetBytes: 64 * 1024 * 1024, adapterBudgetBytes: 256 * 1024 * 1024,
          maxBatchTokens: 512, maxRunningRequests: 1, maxInputTokens: maxTotalTokens - 1, maxTotalTokens, blockSize: 16, seed: 0, loraDtype,
        });
      }
      let report;
      try {
        report = await verifyBank(bank, {
          sources,
          ...(maxError !== undefined ? { maxError } : {}),
          ...(engine ? { modelCheck: engineModelCheck(engine, tokens) } : {}),
        });
      } finally {
        await engine?.close();
      }
      if (options.json) {
        process.stdout.write(jsonText(report));
      } else {
        for (const problem of report.fileProblems) process.stdout.write(`CORRUPT ${problem.file}: ${problem.message}\n`);
        process.stdout.write(`${report.adapters.length} adapters, budget ${report.maxErrorBudget ?? 'none'}; errors ${sources.size > 0 ? `measured against ${sources.size} original(s)` : 'as recorded'} (worst first)\n`);
        for (const a of report.adapters) {
          const check = a.modelCheck && a.modelCheck.tokens > 0
            ? `  model: KL mean ${a.modelCheck.meanKl.toExponential(2)} max ${a.modelCheck.maxKl.toExponential(2)}, top-1 agreement ${(100 * a.modelCheck.top1Agreement).toFixed(1)}%, |logprob gap| mean ${a.modelCheck.meanLogprobGap.toFixed(4)} max ${a.modelCheck.maxLogprobGap.toFixed(4)} over ${a.modelCheck.tokens} tokens`
            : '';
          process.stdout.write(`${a.overBudget ? 'OVER' : 'ok  '} ${a.id}  cluster ${a.cluster}  max ${formatError(a.maxError)}  mean ${formatError(a.meanError)}  [${a.basis}]${a.budget !== report.maxErrorBudget ? `  (budget ${a.budget ?? 'none'})` : ''}${check}\n`);
          for (const s of [...a.slots].sort((x, y) => y.relativeError - x.relativeError).slice(0, a.overBudget ? a.slots.length : 3)) {
            process.stdout.write(`      ${s.path}  ${s.storage}  ${formatError(s.relativeError)}${s.recordedError !== null && a.basis === 'source' ? `  (recorded ${formatError(s.recordedError)})` : ''}\n`);
          }
        }
      }
      if (report.overBudget.length > 0 || report.fileProblems.length > 0) {
        process.stderr.write(`soppu verify: ${report.overBudget.length} adapter(s) over budget${report.fileProblems.length ? `, ${report.fileProblems.length} corrupt file(s)` : ''}\n`);
        process.exitCode = 1;
      }
    });
}
