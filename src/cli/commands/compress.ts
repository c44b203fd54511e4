import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { SoppuError } from '../../errors/soppu-error.js';
import { compressIntoBank } from '../../compress/bank-compress.js';
import { loadAdapterArguments } from '../../compress/bank-source.js';
import type { BankManifest } from '../../compress/bank-manifest.js';
import type { CompressOptions, JdMethod } from '../../compress/compression-types.js';
import { bankStatistics, formatBytes, formatCount } from '../../compress/report-statistics.js';
import { parseInteger } from '../parse-integer.js';
import { jsonText } from '../../io/snake-case-keys.js';

/** A progress callback drawing a bar on stderr when it is a TTY (nothing otherwise), and its stop. */
export function progressBar(label: string): { onProgress: (done: number, total: number, what: string) => void; stop: () => void } {
  if (!process.stderr.isTTY) return { onProgress: () => undefined, stop: () => undefined };
  const bar = new cliProgress.SingleBar({ stream: process.stderr, format: `${label} [{bar}] {value}/{total} {what}`, hideCursor: true, clearOnComplete: true }, cliProgress.Presets.shades_classic);
  let started = false;
  return {
    onProgress: (done, total, what) => {
      if (!started) { bar.start(total, 0, { what: '' }); started = true; }
      bar.setTotal(total);
      bar.update(done, { what });
    },
    stop: () => { if (started) bar.stop(); },
  };
}

export function parseError(value: string | undefined, field: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!(n > 0 && n <= 1)) throw new SoppuError('CONFIG', `--${field} must be a relative error in (0, 1], got "${value}"`, { field, limit: '(0, 1]' });
  return n;
}

export function parseMethod(value: string): JdMethod {
  if (value !== 'jd-full' && value !== 'jd-diag') throw new SoppuError('CONFIG', `--method must be jd-full or jd-diag, got "${value}"`, { field: 'method' });
  return value;
}

/** The summary printed after compress and refit. */
export function summaryLines(manifest: BankManifest, dir: string): string[] {
  const s = bankStatistics(manifest);
  const lines = [
    `bank ${dir}: ${s.adapters} adapters, ${manifest.slots.length} slots, ${s.clusters} cluster(s), ${s.method}`,
    `parameters: ${formatCount(s.rawParameters)} raw → ${formatCount(s.storedParameters)} stored (${s.parameterRatio.toFixed(2)}×; bases ${formatCount(s.basesParameters)}, cores ${formatCount(s.coreParameters)}, raw slots ${formatCount(s.rawSlotParameters)})`,
    `bytes: ${formatBytes(s.rawBytesF32)} raw at f32 → ${formatBytes(s.storedBytes)} on disk (${s.byteRatio.toFixed(2)}×)`,
    `relative error: mean ${s.meanError.toFixed(4)}, max ${s.maxError.toFixed(4)} (per adapter and slot, ‖ΔW − UΣVᵀ‖/‖ΔW‖)`,
  ];
  const worst = s.adapterStats.slice(0, 5);
  if (worst.length > 0) lines.push(`worst adapters: ${worst.map((a) => `${a.id} ${a.maxError.toFixed(4)}${a.worstSlot ? ` (${a.worstSlot})` : ''}`).join(', ')}`);
  const raw = s.slots.reduce((n, x) => n + x.raw, 0);
  if (raw > 0) lines.push(`kept raw: ${raw} adapter slot(s) (compression would cost more, or missed the budget)`);
  if (manifest.refitAdvised) lines.push(`refit advised: ${manifest.refitReasons.join('; ')}`);
  return lines;
}

interface CompressCliOptions {
  output: string;
  maxError?: string;
  rank?: string;
  clusters?: string;
  method: string;
  seed?: string;
  weighting?: string;
  maxSweeps?: string;
  force?: boolean;
  ignoreBaseModel?: boolean;
  json?: boolean;
}

/** `soppu compress <adapter dirs...> -o bank/`. */
export function register(program: Command): void {
  program
    .command('compress')
    .description('compress PEFT LoRA adapters jointly (shared bases per slot and cluster) into an adapter bank')
    .argument('<adapters...>', 'adapter directories; the id is the directory name, or give id=dir')
    .requiredOption('-o, --output <dir>', 'bank directory to create')
    .option('--max-error <e>', 'error budget: smallest shared rank per slot with every adapter\'s relative error ≤ e (default 0.1 unless --rank)')
    .option('--rank <R>', 'fixed shared rank per slot (an upper bound with --max-error)')
    .option('--clusters <c>', 'number of adapter clusters, each with its own bases', '1')
    .option('--method <m>', 'jd-full (full R×R core per adapter) or jd-diag (diagonal core)', 'jd-full')
    .option('--seed <n>', 'random seed (results are reproducible)')
    .option('--weighting <w>', 'unit-norm (every adapter counts equally) or none')
    .option('--max-sweeps <n>', 'most alternating sweeps per fit')
    .option('--force', 'replace a bank that already exists at the output')
    .option('--ignore-base-model', 'take adapters whose base_model_name_or_path differ (the same model under other names: a folder and a hub id)')
    .option('--json', 'print the manifest summary as JSON')
    .action(async (dirs: string[], options: CompressCliOptions) => {
      const compress: CompressOptions = {
        method: parseMethod(options.method),
        ...(options.rank !== undefined ? { rank: parseInteger(options.rank, 'rank', 1)! } : {}),
        ...(options.maxError !== undefined ? { maxError: parseError(options.maxError, 'max-error')! } : {}),
        clusters: parseInteger(options.clusters, 'clusters', 1)!,
        ...(options.seed !== undefined ? { seed: parseInteger(options.seed, 'seed', 0)! } : {}),
        ...(options.maxSweeps !== undefined ? { maxSweeps: parseInteger(options.maxSweeps, 'max-sweeps', 1)! } : {}),
        ...(options.weighting !== undefined ? { weighting: weightingOf(options.weighting) } : {}),
      };
      const inputs = await loadAdapterArguments(dirs);
      const bar = progressBar('compress');
      let manifest: BankManifest;
      try {
        manifest = await compressIntoBank(inputs, options.output, { compress: { ...compress, onProgress: bar.onProgress }, replace: options.force ?? false, ignoreBaseModel: options.ignoreBaseModel ?? false });
      } finally {
        bar.stop();
      }
      if (options.json) {
        process.stdout.write(jsonText(bankStatistics(manifest)));
        return;
      }
      for (const line of summaryLines(manifest, options.output)) process.stdout.write(`${line}\n`);
    });
}

function weightingOf(value: string): 'unit-norm' | 'none' {
  if (value !== 'unit-norm' && value !== 'none') throw new SoppuError('CONFIG', `--weighting must be unit-norm or none, got "${value}"`, { field: 'weighting' });
  return value;
}
