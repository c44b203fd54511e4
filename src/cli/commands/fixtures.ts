import path from 'node:path';
import type { Command } from 'commander';
import { SoppuError } from '../../errors/soppu-error.js';
import { BASE_SHAPE_NAMES, BASE_SHAPES, readBaseShapeFromModelDir, type BaseShapeName } from '../../io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../io/fixtures/generate-adapters.js';
import type { WeightDtype } from '../../tensor/dtype.js';
import { addFixturesModelCommand } from './fixtures-model.js';
import { refuseNonEmptyOutput } from '../output-folder.js';
import { parseChoice } from '../parse-choice.js';
import { parseInteger } from '../parse-integer.js';
import { jsonText } from '../../io/snake-case-keys.js';

function positive(value: string | undefined, option: string): number | undefined {
  if (value === undefined) return undefined;
  const parsed = Number(value);
  if (!Number.isFinite(parsed) || parsed <= 0) throw new SoppuError('CONFIG', `--${option} must be a positive number (got "${value}")`, { field: option });
  return parsed;
}

interface AdaptersOptions {
  force?: boolean;
  base?: string;
  model?: string;
  count: string;
  out: string;
  rank?: string;
  targets?: string;
  sharedRank?: string;
  dtype: string;
  seed: string;
  alpha?: string;
  layers?: string;
  deltaStd?: string;
  noise?: string;
  rslora?: boolean;
  doubledPrefix?: boolean;
  adapterName?: string;
  json?: boolean;
}

/** `fixtures adapters`: deterministic PEFT LoRA adapters for a base shape or a model directory. */
export function addFixturesAdaptersCommand(fixtures: Command): void {
  fixtures
    .command('adapters')
    .description('write N deterministic PEFT LoRA adapters (DIR/user-0000 …) for a base shape')
    .option('--base <shape>', `base shape: ${BASE_SHAPE_NAMES.join(' | ')} (default tiny)`)
    .option('--model <dir>', 'take the shapes from a model directory\'s config.json instead')
    .requiredOption('--count <n>', 'number of adapters')
    .requiredOption('--out <dir>', 'output folder')
    .option('--rank <r>', 'LoRA rank (default 8)')
    .option('--targets <list>', 'comma-separated module names (default q_proj,v_proj; c_attn for gpt2)')
    .option('--shared-rank <k>', 'plant a shared subspace of rank K per slot (0: independent adapters)', '0')
    .option('--dtype <dtype>', 'factor dtype: f32 | bf16 | f16', 'f32')
    .option('--seed <n>', 'random seed', '0')
    .option('--alpha <a>', 'lora_alpha (default 2·rank)')
    .option('--layers <n>', 'adapt only the first N layers')
    .option('--delta-std <x>', 'RMS of the entries of scale·B·A (default 0.02)')
    .option('--noise <x>', 'independent fraction of each factor with --shared-rank (default 0.1)')
    .option('--rslora', 'use rsLoRA scaling (alpha/√r)')
    .option('--doubled-prefix', 'write keys with a doubled base_model.model. prefix (test variant)')
    .option('--adapter-name <name>', 'write keys as .lora_A.<name>.weight (test variant)')
    .option('--json', 'print a JSON summary')
    .option('--force', 'write into a folder that already holds files (its user-NNNN adapters are replaced)')
    .action(async (options: AdaptersOptions) => {
      if (options.base !== undefined && options.model !== undefined) throw new SoppuError('CONFIG', '--base and --model are exclusive: give one', { field: 'base' });
      await refuseNonEmptyOutput(options.out, options.force === true, '--out');
      const base = options.model !== undefined
        ? await readBaseShapeFromModelDir(options.model)
        : BASE_SHAPES[parseChoice(options.base ?? 'tiny', BASE_SHAPE_NAMES, 'base') as BaseShapeName];
      const count = parseInteger(options.count, 'count', 1)!;
      const noise = options.noise === undefined ? undefined : Number(options.noise);
      if (noise !== undefined && !(noise >= 0 && noise <= 1)) throw new SoppuError('CONFIG', `--noise must be between 0 and 1 (got "${options.noise}")`, { field: 'noise' });
      const targets = options.targets?.split(',').map((t) => t.trim()).filter((t) => t.length > 0);
      const dtype = parseChoice<WeightDtype>(options.dtype, ['f32', 'bf16', 'f16'], 'dtype');
      const dirs = await writeGeneratedAdapters(options.out, count, {
        base,
        rank: parseInteger(options.rank, 'rank', 1),
        targets,
        sharedRank: parseInteger(options.sharedRank, 'shared-rank', 0),
        alpha: positive(options.alpha, 'alpha'),
        seed: parseInteger(options.seed, 'seed', 0),
        layers: parseInteger(options.layers, 'layers', 1),
        deltaStd: positive(options.deltaStd, 'delta-std'),
        noise,
        rslora: options.rslora ?? false,
        // the folder as one name however it was typed (m/, ./m): adapters of one model then go together in a bank
        baseModelName: options.model === undefined ? undefined : path.resolve(options.model),
      }, { dtype, doubledPrefix: options.doubledPrefix ?? false, adapterName: options.adapterName });
      if (options.json) {
        process.stdout.write(jsonText({ base: base.name, count: dirs.length, dtype, dirs }));
        return;
      }
      process.stdout.write(`wrote ${dirs.length} adapters for ${base.name} to ${options.out} (${dirs[0]} … ${dirs[dirs.length - 1]})\n`);
    });
}

/** Subcommands of the `fixtures` group: adding one is one entry here. */
const FIXTURE_SUBCOMMANDS: ReadonlyArray<{ readonly name: string; readonly add: (group: Command) => void }> = [
  { name: 'adapters', add: addFixturesAdaptersCommand },
  { name: 'model', add: addFixturesModelCommand },
];

/** `soppu fixtures …`: joins the group if another command file already created it. */
export function register(program: Command): void {
  const group = program.commands.find((c) => c.name() === 'fixtures') ?? program.command('fixtures').description('write deterministic test fixtures (models, adapters)');
  for (const sub of FIXTURE_SUBCOMMANDS) if (!group.commands.some((c) => c.name() === sub.name)) sub.add(group);
}
