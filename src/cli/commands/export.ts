import type { Command } from 'commander';
import { SoppuError } from '../../errors/soppu-error.js';
import { openBank } from '../../compress/bank-reader.js';
import { exportAdapter } from '../../compress/export-adapter.js';
import type { WeightDtype } from '../../tensor/dtype.js';
import { refuseNonEmptyOutput } from '../output-folder.js';

/** `soppu export bank/ <id> -o out/`. */
export function register(program: Command): void {
  program
    .command('export')
    .description('write one bank adapter as a standard PEFT LoRA adapter whose ΔW equals the bank\'s reconstruction (loadable by PEFT, LoRAX, vLLM and SOPPU)')
    .argument('<bank>', 'bank directory')
    .argument('<adapter-id>', 'adapter id in the bank')
    .requiredOption('-o, --output <dir>', 'output adapter directory')
    .option('--dtype <dtype>', 'f32, bf16 or f16', 'f32')
    .option('--force', 'write into an output folder that already holds files (an adapter there is replaced)')
    .action(async (dir: string, id: string, options: { output: string; dtype: string; force?: boolean }) => {
      if (!['f32', 'bf16', 'f16'].includes(options.dtype)) throw new SoppuError('CONFIG', `--dtype must be f32, bf16 or f16, got "${options.dtype}"`, { field: 'dtype' });
      const bank = await openBank(dir);
      bank.adapter(id); // an unknown id is ADAPTER_NOT_FOUND before anything about the output
      await refuseNonEmptyOutput(options.output, options.force === true, '-o');
      const summary = await exportAdapter(bank, id, options.output, { dtype: options.dtype as WeightDtype });
      process.stdout.write(`exported ${id} to ${options.output}: ${summary.modules} module(s) in ${summary.dtype}${summary.zeroSlots ? `, ${summary.zeroSlots} zero slot(s) left out (ΔW = 0)` : ''}\n`);
    });
}
