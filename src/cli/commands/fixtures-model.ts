import type { Command } from 'commander';
import type { ModelArchName, ModelDtypeName, ModelShapeName } from '../../io/fixtures/generate-model.js';
import { generateModel, MODEL_SHAPES } from '../../io/fixtures/generate-model.js';
import { refuseNonEmptyOutput } from '../output-folder.js';
import { parseChoice } from '../parse-choice.js';
import { parseInteger } from '../parse-integer.js';
import { jsonText } from '../../io/snake-case-keys.js';

interface ModelOptions {
  out: string;
  shape: string;
  dtype: string;
  seed: string;
  arch: string;
  tied?: boolean;
  shards?: string;
  layers?: string;
  json?: boolean;
  force?: boolean;
}

/** `soppu fixtures model`: added to the `fixtures` group by fixtures.ts. */
export function addFixturesModelCommand(fixtures: Command): void {
  fixtures
    .command('model')
    .description('write a deterministic random Llama-family model (config, safetensors, tokenizer, chat template)')
    .requiredOption('--out <dir>', 'output folder')
    .option('--shape <name>', `model shape: ${Object.keys(MODEL_SHAPES).join(' | ')}`, 'tiny')
    .option('--dtype <dtype>', 'weight dtype: f32 | bf16 | f16', 'f32')
    .option('--seed <n>', 'random seed', '0')
    .option('--arch <arch>', 'architecture: llama | qwen2 | mistral', 'llama')
    .option('--tied', 'tie lm_head to the embedding (default: the shape\'s default)')
    .option('--no-tied', 'keep a separate lm_head')
    .option('--shards <n>', 'number of safetensors shards (default: 1, or ≤ 2 GiB each)')
    .option('--layers <n>', 'override the number of layers')
    .option('--json', 'print a JSON summary')
    .option('--force', 'write into an output folder that already holds files (its weights are replaced)')
    .action(async (options: ModelOptions) => {
      await refuseNonEmptyOutput(options.out, options.force === true, '--out');
      const generated = await generateModel({
        out: options.out,
        shape: parseChoice(options.shape, Object.keys(MODEL_SHAPES) as ModelShapeName[], 'shape'),
        dtype: parseChoice<ModelDtypeName>(options.dtype, ['f32', 'bf16', 'f16'], 'dtype'),
        arch: parseChoice<ModelArchName>(options.arch, ['llama', 'qwen2', 'mistral'], 'arch'),
        seed: parseInteger(options.seed, 'seed', 0),
        tied: options.tied,
        shards: parseInteger(options.shards, 'shards', 1),
        numLayers: parseInteger(options.layers, 'layers', 1),
      });
      if (options.json) {
        process.stdout.write(jsonText({ dir: generated.dir, files: generated.files, weightBytes: generated.weightBytes, config: generated.config }));
        return;
      }
      process.stdout.write(`wrote ${generated.dir}: ${generated.files.join(', ')} (${(generated.weightBytes / 1024 ** 2).toFixed(1)} MiB of weights)\n`);
    });
}
