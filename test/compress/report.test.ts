import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openBank } from '../../src/compress/bank-reader.js';
import { writeBank } from '../../src/compress/bank-writer.js';
import type { CompressionResult } from '../../src/compress/compression-types.js';
import { buildReport, writeReport } from '../../src/compress/report-html.js';
import { renderVegaLite } from '../../src/compress/report-charts.js';
import { bankStatistics } from '../../src/compress/report-statistics.js';

const PATH_0 = 'model.layers.0.self_attn.q_proj';
const PATH_1 = 'model.layers.1.self_attn.q_proj';

/** Hand-built: two slots [out 3, in 4], one cluster at rank 2; "a<b>" compressed, "b" raw in slot 0 and compressed in slot 1. */
function handResult(): CompressionResult {
  const bases = { rank: 2, u: new Float32Array([1, 0, 0, 1, 0, 0]), vt: new Float32Array([1, 0, 0, 0, 0, 1, 0, 0]) };
  return {
    method: 'jd-full', clusters: 1,
    adapters: [
      { id: 'a<b>', source: '/x/a', cluster: 0, baseModel: 'tiny', sourceDtype: 'F32', flags: [], rawParameters: 2 * 7 + 2 * 7 },
      { id: 'b', source: '/x/b', cluster: 0, baseModel: 'tiny', sourceDtype: 'BF16', flags: [], rawParameters: 1 * 7 + 2 * 7 },
    ],
    slots: [
      {
        path: PATH_0, inFeatures: 4, outFeatures: 3, method: 'jd-full', bases: [bases], sweeps: 3,
        adapters: new Map([
          ['a<b>', { storage: 'compressed', core: new Float32Array([1, 0, 0, 2]), relativeError: 0.1 }],
          ['b', { storage: 'raw', rank: 1, a: new Float32Array(4).fill(1), b: new Float32Array(3).fill(1), relativeError: 0, reason: 'over-budget' }],
        ]),
        errorByRank: [{ cluster: 0, rank: 1, maxError: 0.6, meanError: 0.4 }, { cluster: 0, rank: 2, maxError: 0.1, meanError: 0.05 }],
      },
      {
        path: PATH_1, inFeatures: 4, outFeatures: 3, method: 'jd-full', bases: [bases], sweeps: 2,
        adapters: new Map([
          ['a<b>', { storage: 'compressed', core: new Float32Array([1, 0, 0, 1]), relativeError: 0.02 }],
          ['b', { storage: 'compressed', core: new Float32Array([3, 0, 0, 1]), relativeError: 0.3 }],
        ]),
      },
    ],
    options: { method: 'jd-full', maxError: 0.4, seed: 1 },
  };
}

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-report-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('bank report', () => {
  it('counts parameters and pairs errors by adapter and slot', async () => {
    const extras = new Map([
      ['a<b>', { passthrough: [], config: null, sourceRanks: new Map([[PATH_0, 2], [PATH_1, 2]]) }],
      ['b', { passthrough: [], config: null, sourceRanks: new Map([[PATH_0, 1], [PATH_1, 2]]) }],
    ]);
    const manifest = await writeBank(join(root, 'bank'), handResult(), extras);
    const stats = bankStatistics(manifest);
    expect(stats.rawParameters).toBe(28 + 21);
    expect(stats.basesParameters).toBe(2 * 2 * 7); // rank 2 × (in + out) per slot
    expect(stats.coreParameters).toBe(3 * 4); // three compressed cores of 2×2
    expect(stats.rawSlotParameters).toBe(7);
    expect(stats.storedParameters).toBe(28 + 12 + 7);
    expect(stats.parameterRatio).toBeCloseTo(49 / 47, 12);
    expect(stats.slots.map((s) => s.rawParameters)).toEqual([14 + 7, 14 + 14]);
    expect(stats.slots[1]!.errors).toEqual([{ id: 'a<b>', relativeError: 0.02, storage: 'compressed' }, { id: 'b', relativeError: 0.3, storage: 'compressed' }]);
    expect(stats.slots[0]!.meanError).toBeCloseTo(0.05, 12);
    expect(stats.adapterStats.map((a) => [a.id, a.maxError, a.worstSlot])).toEqual([['b', 0.3, PATH_1], ['a<b>', 0.1, PATH_0]]);
    expect(stats.storedBytes).toBe(Object.values(manifest.files).reduce((s, f) => s + f.bytes, 0));
    // 1,000 adapters on 128 slots (Llama-7B's q, k, v, o): 128k errors, past what Math.max(...errors) takes
    const slots = Array.from({ length: 128 }, (_, i) => ({ ...manifest.slots[0]!, path: `layers.${i}.self_attn.q_proj` }));
    const adapters = Array.from({ length: 1000 }, (_, a) => ({
      ...manifest.adapters[0]!,
      id: `user-${a}`,
      perSlot: Object.fromEntries(slots.map((slot, i) => [slot.path, { ...manifest.adapters[0]!.perSlot[PATH_0]!, relativeError: (a * 128 + i) / 1e6 }])),
    }));
    const large = bankStatistics({ ...manifest, slots, adapters });
    expect(large.maxError).toBeCloseTo(127_999 / 1e6, 12);
    expect(large.slots[127]!.maxError).toBeCloseTo((999 * 128 + 127) / 1e6, 12);
  });

  it('renders a self-contained HTML page and report.json', async () => {
    const bank = await openBank(join(root, 'bank'));
    const report = await buildReport(bank.manifest, 'bank <test>');
    expect(report.html).toContain('<title>bank &lt;test&gt;</title>');
    expect(report.html).toContain('a&lt;b&gt;');
    expect(report.html).not.toContain('<b>');
    expect(report.html.match(/<svg/g)).toHaveLength(3);
    expect(report.html).not.toMatch(/(src|href)=["']?https?:|url\(\s*["']?https?:|<script|<link|@import/i);
    // one dot per (adapter, slot) pair: 4
    const symbols = /<g class="mark-symbol[^"]*"[^>]*>(.*?)<\/g>/s.exec(report.html)![1]!;
    expect(symbols.match(/<path/g)).toHaveLength(4);
    expect(report.html).toMatch(/bars: mean relative error/);
    const written = await writeReport(bank.manifest, join(root, 'out.html'), 'x');
    const json = JSON.parse(await readFile(written.json, 'utf8'));
    expect(written.json).toBe(join(root, 'out.json'));
    expect(json.error_by_rank).toEqual([{ path: PATH_0, points: [{ cluster: 0, rank: 1, max_error: 0.6, mean_error: 0.4 }, { cluster: 0, rank: 2, max_error: 0.1, mean_error: 0.05 }] }]);
    expect(json.worst_adapters[0].id).toBe('b');
    // written again over its own files: fine; over files it did not write (a bank's manifest.json beside
    // manifest.html): refused unless forced; an output that is not .html: refused
    await writeReport(bank.manifest, join(root, 'out.html'), 'x');
    await writeFile(join(root, 'manifest.json'), '{"format": "soppu-bank"}');
    await expect(writeReport(bank.manifest, join(root, 'manifest.html'), 'x')).rejects.toThrow(`${join(root, 'manifest.json')} exists and is not a SOPPU report: choose another output name or pass --force to replace it`);
    expect(await readFile(join(root, 'manifest.json'), 'utf8')).toBe('{"format": "soppu-bank"}');
    await writeReport(bank.manifest, join(root, 'manifest.html'), 'x', { force: true });
    expect(JSON.parse(await readFile(join(root, 'manifest.json'), 'utf8')).report).toBe('soppu-bank-report');
    await expect(writeReport(bank.manifest, join(root, 'r.json'), 'x')).rejects.toThrow('report output');
  });

  it('gives two slots that share "L<layer> <module>" (an encoder\'s and a decoder\'s) their own bars, labelled by path', async () => {
    const result = handResult();
    const paths = ['model.encoder.layers.0.self_attn.q_proj', 'model.decoder.layers.0.self_attn.q_proj'];
    const twin: CompressionResult = { ...result, slots: result.slots.map((slot, i) => ({ ...slot, path: paths[i]! })) };
    const dir = join(root, 'twin-bank');
    await writeBank(dir, twin, new Map());
    const report = await buildReport((await openBank(dir)).manifest, 'twins');
    for (const path of paths) expect(report.html).toContain(path);
    expect(report.html).not.toContain('>L0 self_attn.q_proj<');
  });

  it('renders vega-lite to SVG headless under Node', async () => {
    const svg = await renderVegaLite({ data: { values: [{ x: 'p', y: 1 }, { x: 'q', y: 3 }] }, mark: 'bar', encoding: { x: { field: 'x', type: 'nominal' }, y: { field: 'y', type: 'quantitative' } } });
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toMatch(/mark-rect/);
  });
});
