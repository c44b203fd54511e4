/**
 * `soppu report`: one self-contained HTML file (inline SVG charts, inline CSS, no external URLs)
 * plus report.json with the same numbers.
 */
import { readFile } from 'node:fs/promises';
import { SoppuError } from '../errors/soppu-error.js';
import { writeFileAtomic } from '../io/safetensors.js';
import type { BankManifest } from './bank-manifest.js';
import { reportCharts } from './report-charts.js';
import { bankStatistics, formatBytes, formatCount, type BankStatistics } from './report-statistics.js';
import { jsonText } from '../io/snake-case-keys.js';

export interface BankReport {
  readonly html: string;
  readonly json: Record<string, unknown>;
}

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** vega puts namespace URIs on the root element; they are identifiers, never fetched. Nothing else may point outside. */
function inlineSvg(svg: string): string {
  return svg.replace(/<svg /, '<svg role="img" ');
}

const STYLE = `body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.note{color:#555;font-size:90%}.warn{color:#b30000}
figure{margin:1em 0;overflow-x:auto}`;

export async function buildReport(manifest: BankManifest, title: string, worstCount = 20): Promise<BankReport> {
  const stats = bankStatistics(manifest);
  const charts = await reportCharts(manifest, stats);
  const json = reportJson(manifest, stats);
  const worst = stats.adapterStats.slice(0, worstCount);
  const rows = worst.map((a) => `<tr><td class="l">${escapeHtml(a.id)}</td><td>${a.cluster}</td><td>${a.maxError.toFixed(4)}</td><td>${(a.maxError ** 2).toFixed(4)}</td><td>${a.meanError.toFixed(4)}</td><td class="l">${escapeHtml(a.worstSlot ?? '')}</td><td>${a.compressed}/${a.raw}/${a.zero}</td><td class="l">${escapeHtml(a.flags.join(', '))}</td></tr>`).join('\n');
  const html = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="${REPORT_GENERATOR}"><title>${escapeHtml(title)}</title><style>${STYLE}</style></head>
<body>
<h1>${escapeHtml(title)}</h1>
<p>${stats.adapters} adapters, ${manifest.slots.length} slots, ${stats.clusters} cluster(s), method ${escapeHtml(stats.method)}, bank generation ${manifest.generation}${manifest.baseModel ? `, base model ${escapeHtml(manifest.baseModel)}` : ''}.</p>
${manifest.refitAdvised ? `<p class="warn">Refit advised: ${escapeHtml(manifest.refitReasons.join('; '))}</p>` : ''}
<h2>Compression</h2>
<table><tr><th class="l"></th><th>raw LoRA</th><th>bank</th><th>ratio</th></tr>
<tr><td class="l">parameters</td><td>${formatCount(stats.rawParameters)}</td><td>${formatCount(stats.storedParameters)}</td><td>${stats.parameterRatio.toFixed(2)}×</td></tr>
<tr><td class="l">bytes (raw at f32 vs bank files)</td><td>${formatBytes(stats.rawBytesF32)}</td><td>${formatBytes(stats.storedBytes)}</td><td>${stats.byteRatio.toFixed(2)}×</td></tr></table>
<p class="note">Bank parameters: bases ${formatCount(stats.basesParameters)}, cores ${formatCount(stats.coreParameters)}, slots kept raw ${formatCount(stats.rawSlotParameters)}.</p>
<h2>Relative error per slot</h2>
<p>Mean ${stats.meanError.toFixed(4)}, max ${stats.maxError.toFixed(4)} over every (adapter, slot) pair; each error compares an adapter with its own reconstruction.</p>
<figure>${inlineSvg(charts.errorBySlot)}<figcaption class="note">${escapeHtml(charts.errorBySlotNote)}</figcaption></figure>
<h2>Error versus shared rank</h2>
${charts.errorByRank ? `<figure>${inlineSvg(charts.errorByRank)}<figcaption class="note">Recorded during the rank search: solid/dashed = max/mean relative error over the adapters of one cluster, per slot.</figcaption></figure>` : '<p class="note">No rank search was recorded (the bank was fitted at a fixed rank).</p>'}
<h2>Parameters per slot</h2>
<figure>${inlineSvg(charts.parameters)}<figcaption class="note">Original: Σ r·(in + out) over the adapters with the slot. Bank: shared bases of every cluster + one core per compressed adapter + slots kept raw.</figcaption></figure>
<h2>Worst adapters</h2>
<table><tr><th class="l">adapter</th><th>cluster</th><th>max error</th><th>max error²</th><th>mean error</th><th class="l">worst slot</th><th>compressed/raw/zero</th><th class="l">flags</th></tr>
${rows}</table>
</body></html>
`;
  return { html, json };
}

/** Marks the files a report writes, so writing one again replaces only files it wrote before. */
const REPORT_GENERATOR = 'soppu-bank-report';

function reportJson(manifest: BankManifest, stats: BankStatistics): Record<string, unknown> {
  return {
    report: REPORT_GENERATOR,
    generation: manifest.generation,
    method: stats.method,
    clusters: stats.clusters,
    adapters: stats.adapters,
    parameters: { raw: stats.rawParameters, stored: stats.storedParameters, bases: stats.basesParameters, cores: stats.coreParameters, rawSlots: stats.rawSlotParameters, ratio: stats.parameterRatio },
    bytes: { rawF32: stats.rawBytesF32, stored: stats.storedBytes, ratio: stats.byteRatio },
    error: { mean: stats.meanError, max: stats.maxError },
    slots: stats.slots.map((s) => ({ path: s.path, ranks: s.ranks, compressed: s.compressed, raw: s.raw, zero: s.zero, meanError: s.meanError, maxError: s.maxError, rawParameters: s.rawParameters, storedParameters: s.storedParameters, errors: s.errors })),
    errorByRank: manifest.slots.filter((s) => s.errorByRank).map((s) => ({ path: s.path, points: s.errorByRank })),
    worstAdapters: stats.adapterStats,
    refitAdvised: manifest.refitAdvised,
    refitReasons: manifest.refitReasons,
  };
}

/**
 * Writes the report's HTML at `htmlPath` (an .html or .htm name) and its data beside it (same name,
 * .json). A file already at either path is replaced only when an earlier report wrote it, or with
 * `force`: a bank's manifest.json is beside a report named manifest.html.
 */
export async function writeReport(manifest: BankManifest, htmlPath: string, title: string, options: { force?: boolean } = {}): Promise<{ html: string; json: string }> {
  if (!/\.html?$/i.test(htmlPath)) {
    throw new SoppuError('CONFIG', `report output ${htmlPath}: name an .html file (its data is written beside it as .json)`, { field: 'output', file: htmlPath });
  }
  const jsonPath = htmlPath.replace(/\.html?$/i, '') + '.json';
  if (!options.force) {
    for (const path of [htmlPath, jsonPath]) {
      const existing = await readFile(path, 'utf8').catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? null : ''));
      if (existing !== null && !existing.includes(REPORT_GENERATOR)) {
        throw new SoppuError('CONFIG', `${path} exists and is not a SOPPU report: choose another output name or pass --force to replace it`, { field: 'output', file: path });
      }
    }
  }
  const report = await buildReport(manifest, title);
  await writeFileAtomic(htmlPath, [new TextEncoder().encode(report.html)]);
  await writeFileAtomic(jsonPath, [new TextEncoder().encode(jsonText(report.json))]);
  return { html: htmlPath, json: jsonPath };
}
