import type { Command } from 'commander';
import { resolve } from 'node:path';
import { addToBank } from '../../compress/bank-add.js';
import { openBank } from '../../compress/bank-reader.js';
import { refitBank, type RefitInput } from '../../compress/bank-refit.js';
import { removeFromBank } from '../../compress/bank-remove.js';
import { SoppuError } from '../../errors/soppu-error.js';
import { parseAdapterArgument } from '../../compress/bank-source.js';
import { bankStatistics } from '../../compress/report-statistics.js';
import { loadLoraAdapter } from '../../io/load-lora-adapter.js';
import { parseError, progressBar, summaryLines } from './compress.js';
import { jsonText } from '../../io/snake-case-keys.js';

/** `soppu bank add | rm | refit | ls`. */
export function register(program: Command): void {
  const bank = program.command('bank').description('change or list an adapter bank');

  bank
    .command('add')
    .description('add one adapter to a bank by projecting it onto the existing bases (no refit); slots the bases cannot serve within the budget are kept raw and a refit is advised')
    .argument('<bank>', 'bank directory')
    .argument('<adapter>', 'PEFT adapter directory, or id=directory')
    .option('--id <name>', 'adapter id (default: the directory name)')
    .option('--max-error <e>', 'error budget for the projection (default: the bank\'s; for a bank fitted at a fixed --rank, 0.1 or its members\' largest error)')
    .option('--replace', 'replace the bank\'s adapter of the same id (default: refuse)')
    .option('--ignore-base-model', 'take the adapter though its base_model_name_or_path differs from the bank\'s (the same model under another name: a folder and a hub id)')
    .option('--json', 'print the result as JSON')
    .action(async (dir: string, adapterDir: string, options: { id?: string; maxError?: string; replace?: boolean; ignoreBaseModel?: boolean; json?: boolean }) => {
      // `id=dir` as compress and verify take it
      const argument = parseAdapterArgument(adapterDir);
      const id = options.id ?? argument.id;
      const adapter = await loadLoraAdapter(resolve(argument.dir));
      const maxError = parseError(options.maxError, 'max-error');
      const result = await addToBank(dir, id, adapter, { ...(maxError !== undefined ? { maxError } : {}), replace: options.replace === true, ignoreBaseModel: options.ignoreBaseModel === true });
      if (options.json) {
        process.stdout.write(jsonText({ id, cluster: result.entry.cluster, maxError: result.maxError, budget: result.budget, rawSlots: result.rawSlots, perSlot: result.entry.perSlot, refitAdvised: result.manifest.refitAdvised }));
        return;
      }
      const slots = Object.values(result.entry.perSlot);
      process.stdout.write(`added ${id} to ${dir}: cluster ${result.entry.cluster}, ${slots.filter((p) => p.storage === 'compressed').length} compressed / ${result.rawSlots.length} raw / ${slots.filter((p) => p.storage === 'zero').length} zero slot(s), max relative error ${result.maxError.toFixed(4)} (budget ${result.budget})\n`);
      for (const raw of result.rawSlots) process.stdout.write(`  kept raw: ${raw.path} (${raw.reason})\n`);
      if (result.manifest.refitAdvised) process.stdout.write(`refit advised (soppu bank refit ${dir}): ${result.manifest.refitReasons.join('; ')}\n`);
    });

  bank
    .command('rm')
    .description('remove one adapter from a bank (the shared bases stay; its file is deleted at the next change after this one, so servers that opened the bank before can still load it until they reopen)')
    .argument('<bank>', 'bank directory')
    .argument('<id>', 'adapter id')
    .action(async (dir: string, id: string) => {
      const manifest = await removeFromBank(dir, id);
      process.stdout.write(`removed ${id} from ${dir}: ${manifest.adapters.length} adapter(s) left\n`);
    });

  bank
    .command('refit')
    .description('recompress every adapter of the bank jointly with its recorded options. Each adapter is refitted from its recorded source directory when that is unchanged (same sha256 as when it entered the bank; errors measured against it), else from the bank\'s own reconstruction (exact for raw slots; errors then recorded as bounds: previous + refit, since refitting a lossy reconstruction compounds its error)')
    .argument('<bank>', 'bank directory')
    .option('--from <input>', 'auto (per adapter, as above), sources (every source must be unchanged) or bank (reconstructions only)', 'auto')
    .action(async (dir: string, options: { from: string }) => {
      if (!['auto', 'sources', 'bank'].includes(options.from)) throw new SoppuError('CONFIG', `--from must be auto, sources or bank, got "${options.from}"`, { field: 'from' });
      const bar = progressBar('refit');
      let result;
      try {
        result = await refitBank(dir, { from: options.from as RefitInput, onProgress: bar.onProgress });
      } finally {
        bar.stop();
      }
      process.stdout.write(`refitted ${result.fromSource.length} adapter(s) from their unchanged sources, ${result.fromBank.length} from the bank's reconstruction${result.fromBank.length ? ` (${result.fromBank.slice(0, 5).join(', ')}${result.fromBank.length > 5 ? ', …' : ''})` : ''}\n`);
      for (const line of summaryLines(result.manifest, dir)) process.stdout.write(`${line}\n`);
    });

  bank
    .command('ls')
    .description('list the adapters of a bank: cluster, per-slot storage, ranks and errors')
    .argument('<bank>', 'bank directory')
    .option('--json', 'print JSON')
    .action(async (dir: string, options: { json?: boolean }) => {
      const opened = await openBank(dir);
      const manifest = opened.manifest;
      if (options.json) {
        const adapters = manifest.adapters.map((a) => ({
          id: a.id, cluster: a.cluster, source: a.source, flags: a.flags, addedBy: a.addedBy, errorBasis: a.errorBasis,
          slots: Object.entries(a.perSlot).map(([path, p]) => ({ path, storage: p.storage, rank: p.rank ?? null, relativeError: p.relativeError, ...(p.reason ? { reason: p.reason } : {}) })),
        }));
        process.stdout.write(jsonText({ dir, generation: manifest.generation, method: manifest.method, clusters: manifest.clusters, baseModel: manifest.baseModel, refitAdvised: manifest.refitAdvised, refitReasons: manifest.refitReasons, slots: manifest.slots.map((s) => ({ path: s.path, inFeatures: s.inFeatures, outFeatures: s.outFeatures, ranks: s.ranks })), adapters }));
        return;
      }
      const stats = bankStatistics(manifest);
      process.stdout.write(`${dir}: generation ${manifest.generation}, ${manifest.method}, ${manifest.clusters} cluster(s), ${manifest.adapters.length} adapters, ${manifest.slots.length} slots, ${stats.parameterRatio.toFixed(2)}× fewer parameters\n`);
      for (const slot of manifest.slots) process.stdout.write(`  slot ${slot.path} [${slot.outFeatures}×${slot.inFeatures}] ranks per cluster: ${slot.ranks.map((r) => r ?? '-').join(', ')}\n`);
      for (const a of manifest.adapters) {
        const entries = Object.entries(a.perSlot);
        const max = entries.reduce((m, [, p]) => Math.max(m, p.relativeError), 0);
        process.stdout.write(`${a.id}  cluster ${a.cluster}  max error ${max.toFixed(4)}${a.flags.length ? `  flags ${a.flags.join(',')}` : ''}\n`);
        for (const [path, p] of entries) {
          process.stdout.write(`    ${path}  ${p.storage}${p.rank !== undefined ? ` r=${p.rank}` : ''}  error ${p.relativeError.toFixed(4)}${p.reason ? `  (${p.reason})` : ''}\n`);
        }
      }
      if (manifest.refitAdvised) process.stdout.write(`refit advised: ${manifest.refitReasons.join('; ')}\n`);
    });
}
