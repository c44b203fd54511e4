import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank, reconstructAdapter } from '../../src/compress/bank-reader.js';
import { exportAdapter } from '../../src/compress/export-adapter.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import type { LoraAdapter, LoraModule } from '../../src/io/lora-types.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 32, outFeatures: 32 },
  { path: 'model.layers.0.self_attn.v_proj', inFeatures: 32, outFeatures: 16 },
  { path: 'model.layers.1.mlp.down_proj', inFeatures: 48, outFeatures: 32 },
];

function denseOf(m: Pick<LoraModule, 'a' | 'b' | 'rank' | 'inFeatures' | 'outFeatures' | 'scale'>): Float64Array {
  const d = new Float64Array(m.outFeatures * m.inFeatures);
  for (let o = 0; o < m.outFeatures; o++) for (let p = 0; p < m.rank; p++) {
    const x = m.scale * m.b[o * m.rank + p]!;
    for (let i = 0; i < m.inFeatures; i++) d[o * m.inFeatures + i]! += x * m.a[p * m.inFeatures + i]!;
  }
  return d;
}
function relative(x: Float64Array, y: Float64Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < x.length; i++) { num += (x[i]! - y[i]!) ** 2; den += x[i]! ** 2; }
  return Math.sqrt(num / den);
}

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-export-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('export of a bank adapter as PEFT', () => {
  it('reproduces the reconstruction for jd-diag, mixed ranks (compressed + raw), zero slots and passthrough', async () => {
    const family = syntheticAdapterSet({ slots: SLOTS, count: 4, rank: [4, 8], sharedRank: 3, noise: 0.02, seed: 3 });
    const head = { name: 'base_model.model.score.weight', dtype: 'F32' as const, shape: [2, 3], bytes: new Uint8Array(new Float32Array([1, 2, 3, 4, 5, 6]).buffer) };
    const withHead: LoraAdapter = { ...family[0]!.adapter, passthrough: [head], config: { ...family[0]!.adapter.config, modulesToSave: ['score'], raw: { modules_to_save: ['score'], task_type: 'SEQ_CLS', r: 4 } } };
    const dir = join(root, 'bank');
    await compressIntoBank([{ id: 'head', adapter: withHead }, ...family.slice(1)], dir, { compress: { method: 'jd-diag', rank: 3, clusters: 2, seed: 1 } });
    // a new, unrelated adapter with one untrained slot: two slots raw at r=6, one zero
    const stranger = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 6, sharedRank: 0, seed: 42 })[0]!.adapter;
    const modules = new Map(stranger.modules);
    const v = modules.get(SLOTS[1]!.path)!;
    modules.set(v.path, { ...v, b: new Float32Array(v.b.length) });
    const familyQ = family[1]!.adapter.modules.get(SLOTS[0]!.path)!; // the bank serves this one already
    modules.set(familyQ.path, familyQ); // one slot the bases serve, the other stays raw
    await addToBank(dir, 'stranger', { ...stranger, modules }, { maxError: 0.5 });
    const bank = await openBank(dir);
    expect(bank.adapter('adapter-1').perSlot[SLOTS[0]!.path]!.storage).toBe('compressed');

    for (const id of ['head', 'adapter-1', 'stranger']) {
      const out = join(root, `out-${id}`);
      const summary = await exportAdapter(bank, id, out);
      const exported = await loadLoraAdapter(out);
      const reconstruction = await reconstructAdapter(bank, id);
      expect([...exported.modules.keys()]).toEqual([...reconstruction.keys()]);
      for (const [path, module] of exported.modules) {
        const r = reconstruction.get(path)!;
        expect(module.scale).toBeCloseTo(1, 12);
        expect(module.rank).toBe(r.rank);
        expect(relative(denseOf({ ...r, scale: 1 }), denseOf(module))).toBeLessThan(1e-6);
      }
      if (id === 'stranger') {
        expect(summary.zeroSlots).toBe(1);
        expect(exported.modules.has(SLOTS[1]!.path)).toBe(false);
        const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
        const entry = bank.adapter('stranger');
        expect(entry.perSlot[SLOTS[0]!.path]!.storage).toBe('compressed');
        expect(entry.perSlot[SLOTS[2]!.path]!.storage).toBe('raw');
        // ranks 3 (compressed) and 6 (raw) in one adapter: per-module ranks and alphas go in the patterns
        expect(new Set([...exported.modules.values()].map((m) => m.rank))).toEqual(new Set([3, 6]));
        expect(Object.keys(config.rank_pattern)).toHaveLength(1);
        // the raw slot comes back exactly
        expect(relative(denseOf(stranger.modules.get(SLOTS[2]!.path)!), denseOf(exported.modules.get(SLOTS[2]!.path)!))).toBeLessThan(1e-6);
      }
      if (id === 'head') {
        const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
        expect(config.modules_to_save).toEqual(['score']);
        expect(config.task_type).toBe('SEQ_CLS');
        expect(exported.passthrough).toEqual([expect.objectContaining({ name: 'base_model.model.score.weight', shape: [2, 3] })]);
        expect(Array.from(exported.passthrough[0]!.bytes)).toEqual(Array.from(head.bytes));
      }
    }
  });

  it('writes bf16 and f16 within their rounding of the reconstruction', async () => {
    const family = syntheticAdapterSet({ slots: SLOTS.slice(0, 1), count: 3, rank: 4, sharedRank: 2, seed: 9 });
    const dir = join(root, 'bank16');
    await compressIntoBank(family, dir, { compress: { method: 'jd-full', maxError: 0.1, seed: 1 } });
    const bank = await openBank(dir);
    const r = (await reconstructAdapter(bank, 'adapter-2')).get(SLOTS[0]!.path)!;
    for (const dtype of ['bf16', 'f16'] as const) {
      const out = join(root, `16-${dtype}`);
      await exportAdapter(bank, 'adapter-2', out, { dtype });
      const m = (await loadLoraAdapter(out)).modules.get(SLOTS[0]!.path)!;
      expect(relative(denseOf({ ...r, scale: 1 }), denseOf(m))).toBeLessThan(dtype === 'bf16' ? 2e-2 : 2e-3);
    }
  });
});
