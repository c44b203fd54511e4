import type { Command } from 'commander';
import { openBank } from '../../compress/bank-reader.js';
import { writeReport } from '../../compress/report-html.js';

/** `soppu report bank/ -o report.html`. */
export function register(program: Command): void {
  program
    .command('report')
    .description('write a self-contained HTML report of a bank (inline SVG charts: ratios, per-slot errors with one dot per adapter, error vs rank, parameters; worst adapters) and its data beside it (<name>.json)')
    .argument('<bank>', 'bank directory')
    .requiredOption('-o, --output <file>', 'HTML file to write (.html); its data goes beside it as <name>.json')
    .option('--force', 'replace files at those paths that an earlier report did not write')
    .action(async (dir: string, options: { output: string; force?: boolean }) => {
      const bank = await openBank(dir);
      const written = await writeReport(bank.manifest, options.output, `SOPPU adapter bank ${dir}`, { force: options.force === true });
      process.stdout.write(`wrote ${written.html} and ${written.json}\n`);
    });
}
