/**
 * The report's charts: vega-lite specs compiled to vega and rendered to SVG headless with vega's
 * View.toSVG() (renderer 'none': no canvas, no DOM, no network).
 */
import { View, parse } from 'vega';
import { compile, type TopLevelSpec } from 'vega-lite';
import type { BankManifest } from './bank-manifest.js';
import type { BankStatistics } from './report-statistics.js';

/** Renders a vega-lite spec to an SVG string. */
export async function renderVegaLite(spec: TopLevelSpec): Promise<string> {
  const compiled = compile(spec).spec;
  const view = new View(parse(compiled), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Dots are capped so a large bank's report stays a reasonable size; beyond it, the worst adapters only. */
export const MAX_DOTS = 40_000;

function shortLabel(path: string): string {
  const match = /\.(\d+)\.(.+)$/.exec(path);
  return match ? `L${match[1]} ${match[2]}` : path;
}

/**
 * Each slot's axis label: "L<layer> <module>", or its whole path where two slots would share that (an encoder's
 * and a decoder's layer 0 q_proj): a shared label merged their bars into one stacked bar.
 */
function slotLabels(paths: readonly string[]): Map<string, string> {
  const count = new Map<string, number>();
  for (const path of paths) count.set(shortLabel(path), (count.get(shortLabel(path)) ?? 0) + 1);
  return new Map(paths.map((path) => [path, count.get(shortLabel(path))! > 1 ? path : shortLabel(path)]));
}

export interface ReportCharts {
  readonly errorBySlot: string;
  readonly errorBySlotNote: string;
  readonly errorByRank: string | null;
  readonly parameters: string;
}

export async function reportCharts(manifest: BankManifest, stats: BankStatistics): Promise<ReportCharts> {
  const labels = slotLabels([...new Set([...stats.slots.map((s) => s.path), ...manifest.slots.map((s) => s.path)])]);
  const slotLabel = (path: string): string => labels.get(path) ?? shortLabel(path);
  // per-slot errors: bars = mean over the adapters that have the slot; one dot per adapter (own error, own slot)
  const totalDots = stats.slots.reduce((n, s) => n + s.errors.length, 0);
  let dotIds: Set<string> | null = null;
  let note = 'bars: mean relative error over the adapters that have the slot; ticks: max; dots: one adapter each (its own error on that slot).';
  if (totalDots > MAX_DOTS) {
    const keep = Math.max(1, Math.floor(MAX_DOTS / Math.max(1, stats.slots.length)));
    dotIds = new Set(stats.adapterStats.slice(0, keep).map((a) => a.id));
    note += ` Dots shown for the ${keep} worst adapters only (${totalDots} in all); bars and ticks use every adapter.`;
  }
  const bars = stats.slots.map((s) => ({ slot: slotLabel(s.path), mean: s.meanError, max: s.maxError }));
  const dots = stats.slots.flatMap((s) => s.errors.filter((e) => !dotIds || dotIds.has(e.id)).map((e) => ({ slot: slotLabel(s.path), adapter: e.id, error: e.relativeError, storage: e.storage })));
  const order = stats.slots.map((s) => slotLabel(s.path));
  const width = Math.min(1400, Math.max(300, 22 * order.length));
  const errorBySlot = await renderVegaLite({
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    width, height: 260,
    layer: [
      { data: { values: bars }, mark: { type: 'bar', color: '#9ecae1' }, encoding: { x: { field: 'slot', type: 'nominal', sort: order, title: 'slot (layer, module)' }, y: { field: 'mean', type: 'quantitative', title: 'relative error ‖ΔW − UΣVᵀ‖/‖ΔW‖' } } },
      { data: { values: bars }, mark: { type: 'tick', color: '#de2d26', thickness: 2 }, encoding: { x: { field: 'slot', type: 'nominal', sort: order }, y: { field: 'max', type: 'quantitative' } } },
      { data: { values: dots }, mark: { type: 'circle', size: 14, opacity: 0.7 }, encoding: { x: { field: 'slot', type: 'nominal', sort: order }, y: { field: 'error', type: 'quantitative' }, color: { field: 'storage', type: 'nominal', title: 'storage', scale: { domain: ['compressed', 'raw', 'zero'], range: ['#3182bd', '#e6550d', '#969696'] } } } },
    ],
  } as TopLevelSpec);

  const curve = manifest.slots.flatMap((s) => (s.errorByRank ?? []).flatMap((p) => [
    { slot: slotLabel(s.path), cluster: `cluster ${p.cluster}`, rank: p.rank, error: p.maxError, statistic: 'max' },
    { slot: slotLabel(s.path), cluster: `cluster ${p.cluster}`, rank: p.rank, error: p.meanError, statistic: 'mean' },
  ]));
  const errorByRank = curve.length === 0 ? null : await renderVegaLite({
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    width: 520, height: 300,
    data: { values: curve },
    mark: { type: 'line', point: true, strokeWidth: 1 },
    encoding: {
      x: { field: 'rank', type: 'quantitative', title: 'shared rank R', axis: { tickMinStep: 1, format: 'd' } },
      y: { field: 'error', type: 'quantitative', title: 'relative error' },
      color: { field: 'slot', type: 'nominal', legend: curve.length > 400 ? null : { title: 'slot' } },
      strokeDash: { field: 'statistic', type: 'nominal', title: 'over adapters' },
      detail: { field: 'cluster', type: 'nominal' },
    },
  } as TopLevelSpec);

  const params = stats.slots.flatMap((s) => [
    { slot: slotLabel(s.path), kind: 'original (raw LoRA)', parameters: s.rawParameters },
    { slot: slotLabel(s.path), kind: 'bank (bases + cores + raw)', parameters: s.storedParameters },
  ]);
  const parameters = await renderVegaLite({
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    width, height: 220,
    data: { values: params },
    mark: 'bar',
    encoding: {
      x: { field: 'slot', type: 'nominal', sort: order, title: 'slot (layer, module)' },
      xOffset: { field: 'kind', type: 'nominal' },
      y: { field: 'parameters', type: 'quantitative', title: 'parameters' },
      color: { field: 'kind', type: 'nominal', title: '', legend: { labelLimit: 400 } },
    },
  } as TopLevelSpec);
  return { errorBySlot, errorBySlotNote: note, errorByRank, parameters };
}
