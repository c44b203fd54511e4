import type { Command } from 'commander';
import { openBank } from '../../compress/bank-reader.js';
import { writeReport } from '../../compress/report-html.js';

/** `soppu report bank/ -o report.html`. */
export function register(program: Command): void {
  program
    .command('report')
    .description('write a self-contained HTML report of a bank (inline SVG charts: ratios, per-slot errors with one dot per adapter, error vs rank, parameters; worst adapters) and report.json beside it')
    .argument('<bank>', 'bank directory')
    .requiredOption('-o, --output <file>', 'HTML file to write (report.json is written beside it)')
    .action(async (dir: string, options: { output: string }) => {
      const bank = await openBank(dir);
      const written = await writeReport(bank.manifest, options.output, `SOPPU adapter bank ${dir}`);
      process.stdout.write(`wrote ${written.html} and ${written.json}\n`);
    });
}
