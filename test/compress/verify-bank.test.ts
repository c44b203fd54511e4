import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { relativeErrorVsSource, verifyBank } from '../../src/compress/verify-bank.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 20, outFeatures: 12 },
  { path: 'model.layers.0.self_attn.k_proj', inFeatures: 20, outFeatures: 8 },
];
const roots: string[] = [];
afterAll(async () => {
  for (const r of roots) await rm(r, { recursive: true, force: true });
});

describe('verify', () => {
  it('factored error equals the dense error', () => {
    const [x, y] = syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 3, sharedRank: 0, seed: 4 });
    const m = x!.adapter.modules.get(SLOTS[0]!.path)!;
    const other = y!.adapter.modules.get(SLOTS[0]!.path)!;
    const rec = { path: m.path, storage: 'raw' as const, rank: other.rank, inFeatures: 20, outFeatures: 12, a: other.a, b: other.b };
    let num = 0, den = 0;
    for (let o = 0; o < 12; o++) for (let i = 0; i < 20; i++) {
      let d = 0, r = 0;
      for (let p = 0; p < 3; p++) { d += m.scale * m.b[o * 3 + p]! * m.a[p * 20 + i]!; r += other.b[o * 3 + p]! * other.a[p * 20 + i]!; }
      num += (d - r) ** 2; den += d * d;
    }
    expect(relativeErrorVsSource(m, rec)).toBeCloseTo(Math.sqrt(num / den), 10);
    expect(relativeErrorVsSource(m, null)).toBe(1);
  });

  it('an original of another shape is refused naming the adapter and its folder, not the slot alone', async () => {
    const root = await mkdtemp(join(tmpdir(), 'soppu-verify-'));
    roots.push(root);
    const set = syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 3, sharedRank: 2, seed: 6 });
    await compressIntoBank(set, join(root, 'bank'), { compress: { method: 'jd-full', maxError: 0.1, seed: 2 } });
    const [big] = syntheticAdapterSet({ slots: [{ ...SLOTS[0]!, inFeatures: 40 }], count: 1, rank: 3, sharedRank: 0, seed: 7 });
    const other = { ...big!.adapter, source: '/adapters/big-one' };
    await expect(verifyBank(await openBank(join(root, 'bank')), { sources: new Map([[set[0]!.id, other]]) }))
      .rejects.toThrow(new RegExp(`^adapter ${set[0]!.id} \\(/adapters/big-one\\): model\\.layers\\.0\\.self_attn\\.q_proj: source is \\[out 12, in 40\\]`));
  });

  it('reports a slot the bank lost (1) and a slot the source lacks (inf), worst first', async () => {
    const root = await mkdtemp(join(tmpdir(), 'soppu-verify-'));
    roots.push(root);
    const set = syntheticAdapterSet({ slots: SLOTS, count: 3, rank: 3, sharedRank: 2, noise: 0.01, seed: 5 });
    await compressIntoBank(set, join(root, 'bank'), { compress: { method: 'jd-full', maxError: 0.1, seed: 2 } });
    const bank = await openBank(join(root, 'bank'));
    const onlyQ = (a: LoraAdapter): LoraAdapter => ({ ...a, modules: new Map([...a.modules].filter(([p]) => p === SLOTS[0]!.path)) });
    const report = await verifyBank(bank, { sources: new Map([['adapter-0', set[0]!.adapter], ['adapter-1', onlyQ(set[1]!.adapter)]]) });
    expect(report.adapters[0]!.id).toBe('adapter-1');
    expect(report.adapters[0]!.maxError).toBe(Number.POSITIVE_INFINITY);
    expect(report.adapters.find((a) => a.id === 'adapter-2')!.basis).toBe('recorded');
    expect(report.adapters.find((a) => a.id === 'adapter-0')!.basis).toBe('source');
    expect(report.overBudget).toEqual(['adapter-1']);
    expect(report.maxErrorBudget).toBe(0.1);
  });
});
