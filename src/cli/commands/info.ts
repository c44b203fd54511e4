import type { Command } from 'commander';
import { describeKernels } from '../../kernels/index.js';
import { jsonText } from '../../io/snake-case-keys.js';

/** `soppu info`: kernel variant, threads, CPU features. */
export function register(program: Command): void {
  program
    .command('info')
    .description('print the chosen kernel variant, supported variants and thread count')
    .option('--json', 'print JSON')
    .action((options: { json?: boolean }) => {
      const description = describeKernels();
      if (options.json) {
        process.stdout.write(jsonText(description));
        return;
      }
      process.stdout.write(`kernel variant: ${description.chosen}\n`);
      process.stdout.write(`variants:       ${description.variants.map((v) => `${v.name}${v.supported ? '' : ' (unsupported)'}`).join(', ')}\n`);
      process.stdout.write(`threads:        ${description.threads}\n`);
      if (description.nativeError) process.stdout.write(`native addon:   unavailable (${description.nativeError})\n`);
    });
}
