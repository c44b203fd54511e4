/**
 * A refit from the bank's reconstruction keeps every stored slot within the bank's error budget of the
 * original adapter: the error the reconstruction already carries counts against the budget.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { refitBank } from '../../src/compress/bank-refit.js';
import { removeFromBank } from '../../src/compress/bank-remove.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { verifyBank } from '../../src/compress/verify-bank.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 32, outFeatures: 32 },
  { path: 'model.layers.0.self_attn.v_proj', inFeatures: 32, outFeatures: 16 },
];

let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-refit-budget-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('bank refit from the bank', () => {
  it('keeps every compressed slot within the budget of the original adapter', async () => {
    const maxError = 0.15;
    // two families and noise: most slots compress near the budget
    const inputs = [
      ...syntheticAdapterSet({ slots: SLOTS, count: 4, rank: 6, sharedRank: 3, noise: 0.2, seed: 3, familySeed: 1 }),
      ...syntheticAdapterSet({ slots: SLOTS, count: 4, rank: 6, sharedRank: 3, noise: 0.2, seed: 4, familySeed: 2 }).map((a, i) => ({ ...a, id: `b-${i}` })),
    ];
    const dir = join(root, 'bank');
    await compressIntoBank(inputs, dir, { compress: { method: 'jd-full', maxError, clusters: 3, seed: 5 } });
    const sources = new Map(inputs.map((i) => [i.id, i.adapter] as const));
    expect((await verifyBank(await openBank(dir), { sources, maxError })).overBudget).toEqual([]);
    const { manifest, fromBank } = await refitBank(dir, { from: 'bank' });
    expect(fromBank).toHaveLength(8);
    // the check below has slots to check
    expect(manifest.adapters.some((a) => Object.values(a.perSlot).some((slot) => slot.storage === 'compressed'))).toBe(true);
    for (const adapter of manifest.adapters) {
      for (const [path, slot] of Object.entries(adapter.perSlot)) {
        if (slot.storage === 'compressed') expect(slot.relativeError, `${adapter.id} ${path} (recorded bound)`).toBeLessThanOrEqual(maxError);
      }
    }
    expect((await verifyBank(await openBank(dir), { sources, maxError })).overBudget).toEqual([]);
  });

  it('an unchanged bank refitted from itself keeps what it compressed: the rank is chosen with the error already spent', async () => {
    const maxError = 0.15;
    const inputs = syntheticAdapterSet({ slots: SLOTS, count: 6, rank: 6, sharedRank: 3, noise: 0.2, seed: 1, familySeed: 1 });
    const dir = join(root, 'bank-unchanged');
    const before = await compressIntoBank(inputs, dir, { compress: { method: 'jd-full', maxError, seed: 5 } });
    const compressedOf = (manifest: typeof before): string[] =>
      manifest.adapters.flatMap((a) => Object.entries(a.perSlot).filter(([, slot]) => slot.storage === 'compressed').map(([path]) => `${a.id} ${path}`)).sort();
    // members that spent most of the budget: a rank that refits them with a small new error is not enough
    const spent = before.adapters.flatMap((a) => Object.values(a.perSlot).map((slot) => slot.relativeError));
    expect(Math.max(...spent)).toBeGreaterThan(maxError / 2);
    expect(compressedOf(before).length).toBeGreaterThan(0);
    const { manifest } = await refitBank(dir, { from: 'bank' });
    expect(compressedOf(manifest)).toEqual(compressedOf(before));
  });
});

describe('bank refit and the cluster count', () => {
  it('fits fewer clusters while the bank has fewer adapters than asked for, and the asked count once they come back', async () => {
    const inputs = syntheticAdapterSet({ slots: SLOTS, count: 4, rank: 4, sharedRank: 2, noise: 0.1, seed: 7, familySeed: 3 });
    const dir = join(root, 'clusters');
    await compressIntoBank(inputs, dir, { compress: { method: 'jd-full', maxError: 0.3, clusters: 3, seed: 5 } });
    for (const input of inputs.slice(0, 2)) await removeFromBank(dir, input.id);
    const shrunk = (await refitBank(dir, { from: 'bank' })).manifest;
    expect(shrunk.clusters).toBe(2);
    expect(shrunk.options.clusters).toBe(3);
    for (const input of inputs.slice(0, 2)) await addToBank(dir, input.id, input.adapter);
    expect((await refitBank(dir, { from: 'bank' })).manifest.clusters).toBe(3);
  });
});
