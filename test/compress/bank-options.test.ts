/**
 * What the bank writes it can read back: a raw slot keeps an adapter's rank even above the layer's
 * dimensions (PEFT allows it), and the manifest's compress options are checked on read like the
 * compressor checks them, so a bad value names options.<field> instead of skewing budgets.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { compressIntoBank } from '../../src/compress/bank-compress.js';
import { MANIFEST_NAME, parseManifest } from '../../src/compress/bank-manifest.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { refitBank } from '../../src/compress/bank-refit.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { verifyBank } from '../../src/compress/verify-bank.js';

const SLOTS = [{ path: 'model.layers.0.self_attn.q_proj', inFeatures: 16, outFeatures: 16 }];

let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-bank-options-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('raw slots of a rank above the layer dimensions', () => {
  it('compress and bank add store them, and the bank stays readable for every adapter', async () => {
    const small = syntheticAdapterSet({ slots: SLOTS, count: 3, rank: 4, sharedRank: 2, seed: 1 });
    const dir = join(root, 'bank');
    await compressIntoBank(small, dir, { compress: { method: 'jd-full', maxError: 0.05, seed: 2 } });
    const [huge] = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 40, sharedRank: 40, seed: 3, idPrefix: 'huge-' });
    await addToBank(dir, 'huge', huge!.adapter);
    const bank = await openBank(dir);
    expect(bank.ids()).toEqual(expect.arrayContaining(['huge', small[0]!.id]));
    const slot = bank.manifest.adapters.find((a) => a.id === 'huge')!.perSlot[SLOTS[0]!.path]!;
    expect(slot).toMatchObject({ storage: 'raw', rank: 40 });
    await expect(bank.loadAdapter(small[0]!.id)).resolves.toBeTruthy();
    await expect(bank.loadAdapter('huge')).resolves.toBeTruthy();

    const big = join(root, 'big');
    await compressIntoBank(syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 40, sharedRank: 40, seed: 4 }), big, { compress: { method: 'jd-full', rank: 1, maxError: 0.05, seed: 2 } });
    expect((await openBank(big)).ids()).toHaveLength(2);
  });
});

describe('bank add into a bank fitted at a fixed rank (no recorded budget)', () => {
  it('holds the projection to the default budget or the members\' largest error, keeping a poor fit raw', async () => {
    const members = syntheticAdapterSet({ slots: SLOTS, count: 3, rank: 4, sharedRank: 2, seed: 8 });
    const dir = join(root, 'fixed-rank');
    await compressIntoBank(members, dir, { compress: { method: 'jd-full', rank: 2, seed: 2 } });
    const fitted = await openBank(dir);
    expect(fitted.manifest.options.maxError).toBeUndefined();
    const membersLargest = Math.max(...fitted.manifest.adapters.map((a) => a.perSlot[SLOTS[0]!.path]!.relativeError));
    // an unrelated adapter (another family): its projection onto the rank-2 bases is a poor fit
    const [stranger] = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 4, seed: 9, familySeed: 77, idPrefix: 'stranger-' });
    const added = await addToBank(dir, 'stranger', stranger!.adapter);
    expect(added.budget).toBe(Math.max(0.1, membersLargest));
    expect(added.entry.perSlot[SLOTS[0]!.path]).toMatchObject({ storage: 'raw', relativeError: 0 });
    expect(added.rawSlots).toEqual([{ path: SLOTS[0]!.path, reason: expect.any(String) }]);
    // the budget is recorded with the adapter, and verify holds it (and only it) to that budget
    expect(added.entry.maxError).toBe(added.budget);
    const [member] = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 2, seed: 8, idPrefix: 'late-' });
    await addToBank(dir, 'late', member!.adapter);
    const report = await verifyBank(await openBank(dir));
    expect(report.maxErrorBudget).toBeNull();
    expect(report.adapters.find((a) => a.id === 'stranger')!.budget).toBe(added.budget);
    expect(report.adapters.find((a) => a.id === members[0]!.id)!.budget).toBeNull();
  });
});

describe('bank add --max-error', () => {
  it('records the budget an adapter was projected under, which verify then holds it to instead of the bank\'s', async () => {
    const members = syntheticAdapterSet({ slots: SLOTS, count: 4, rank: 4, sharedRank: 2, noise: 0.05, seed: 10 });
    const dir = join(root, 'own-budget');
    await compressIntoBank(members.slice(0, 3), dir, { compress: { method: 'jd-full', maxError: 0.05, seed: 2 } });
    const [stranger] = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 4, seed: 11, familySeed: 78, idPrefix: 'stranger-' });
    const loose = await addToBank(dir, 'loose', stranger!.adapter, { maxError: 1 });
    expect(loose.entry.perSlot[SLOTS[0]!.path]!.storage).toBe('compressed');
    expect(loose.entry.perSlot[SLOTS[0]!.path]!.relativeError).toBeGreaterThan(0.05);
    expect(loose.entry.maxError).toBe(1);
    const same = await addToBank(dir, 'same', members[3]!.adapter);
    expect(same.entry.maxError).toBeUndefined(); // the bank's budget: nothing to record
    const report = await verifyBank(await openBank(dir));
    expect(report.maxErrorBudget).toBe(0.05);
    expect(report.overBudget).not.toContain('loose');
    expect(report.adapters.find((a) => a.id === 'loose')!.budget).toBe(1);
    // a budget given to verify applies to every adapter
    expect((await verifyBank(await openBank(dir), { maxError: 0.05 })).overBudget).toContain('loose');
  });
});

describe('bank add of an adapter naming another base model', () => {
  it('is refused, pointing to --ignore-base-model, and taken with it', async () => {
    const members = syntheticAdapterSet({ slots: SLOTS, count: 3, rank: 4, sharedRank: 2, seed: 12 });
    const dir = join(root, 'named');
    await compressIntoBank(members, dir, { compress: { method: 'jd-full', maxError: 0.2, seed: 2 } });
    const bankBase = (await openBank(dir)).manifest.baseModel;
    expect(bankBase).not.toBeNull();
    const [late] = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 2, seed: 12, idPrefix: 'late-' });
    const renamed = { ...late!.adapter, config: { ...late!.adapter.config, baseModelNameOrPath: '/models/the-same-one' } };
    await expect(addToBank(dir, 'late', renamed)).rejects.toThrow(/base model "\/models\/the-same-one" differs from the bank's .*pass --ignore-base-model/);
    const added = await addToBank(dir, 'late', renamed, { ignoreBaseModel: true });
    expect(added.entry.baseModel).toBe('/models/the-same-one');
    expect(added.manifest.baseModel).toBe(bankBase);
    // a refit takes what the bank holds (it failed on the two names), and keeps checking later adds against the
    // name most adapters give (a null had let any name in)
    const refitted = (await refitBank(dir, { from: 'bank' })).manifest;
    expect(refitted.baseModel).toBe(bankBase);
    const stranger = { ...late!.adapter, config: { ...late!.adapter.config, baseModelNameOrPath: 'meta-llama/Llama-3.1-70B' } };
    await expect(addToBank(dir, 'stranger', stranger)).rejects.toThrow(/differs from the bank's/);
    // flagged adds that outnumber the bank's own adapters do not take the bank's model over at a refit
    for (const k of [1, 2, 3]) await addToBank(dir, `late-${k}`, renamed, { ignoreBaseModel: true });
    expect((await refitBank(dir, { from: 'bank' })).manifest.baseModel).toBe(bankBase);
    await expect(addToBank(dir, 'own', members[0]!.adapter)).resolves.toBeTruthy();
  });
});

describe('bank add where the chosen cluster keeps the slot raw', () => {
  it('stores it raw as the bank chose (cheaper-raw), with no refit advised: a refit would choose the same', async () => {
    // three unrelated adapters: shared bases within 5 % would cost more than the raw factors
    const strangers = [1, 2, 3].map((k) => syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 4, seed: 20 + k, familySeed: 90 + k, idPrefix: `s${k}-` })[0]!);
    const dir = join(root, 'all-raw');
    await compressIntoBank(strangers, dir, { compress: { method: 'jd-full', maxError: 0.05, seed: 2 } });
    expect((await openBank(dir)).manifest.slots[0]!.ranks).toEqual([null]);
    const added = await addToBank(dir, 'twin', strangers[0]!.adapter);
    expect(added.entry.perSlot[SLOTS[0]!.path]).toMatchObject({ storage: 'raw', reason: 'cheaper-raw' });
    expect(added.rawSlots).toEqual([{ path: SLOTS[0]!.path, reason: 'cheaper-raw' }]);
    expect(added.manifest.refitAdvised).toBe(false);
  });
});

describe("the manifest's options", () => {
  it('a value the compressor would refuse is BANK_CORRUPT naming options.<field>', async () => {
    const dir = join(root, 'opts');
    await compressIntoBank(syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 4, sharedRank: 2, seed: 5 }), dir, { compress: { method: 'jd-full', maxError: 0.1, seed: 2 } });
    const file = join(dir, MANIFEST_NAME);
    const text = await readFile(file, 'utf8');
    expect(() => parseManifest(text, file)).not.toThrow();
    const withOptions = (options: Record<string, unknown>): string => JSON.stringify({ ...JSON.parse(text), options: { ...JSON.parse(text).options, ...options } });
    const cases: [Record<string, unknown>, string][] = [
      [{ maxError: 'abc' }, 'options.maxError: must be a finite number ≥ 0, got "abc"'],
      [{ maxError: 7 }, 'options.maxError: must be in (0, 1], got 7'],
      [{ rank: -3 }, 'options.rank: must be an integer in [1, 1048576], got -3'],
      [{ clusters: 0 }, 'options.clusters: must be an integer in [1, 65536], got 0'],
      [{ weighting: 'log' }, 'options.weighting: must be one of unit-norm, none, got "log"'],
      [{ tolerance: -1 }, 'options.tolerance: must be a finite number ≥ 0, got -1'],
      [{ maxSweeps: 1.5 }, 'options.maxSweeps: must be an integer'],
      [{ method: 'svd' }, 'options.method: must be one of jd-full, jd-diag, got "svd"'],
    ];
    for (const [options, message] of cases) {
      expect(() => parseManifest(withOptions(options), file), JSON.stringify(options)).toThrow(message);
    }
    await writeFile(file, withOptions({ maxError: 7 }));
    await expect(openBank(dir)).rejects.toMatchObject({ code: 'BANK_CORRUPT', message: expect.stringContaining('options.maxError') });
  });
});

describe('compress checks its output before it compresses', () => {
  it('an existing bank (without replace) or a path under a file is refused first, not after the compression', async () => {
    const inputs = syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 4, sharedRank: 2, seed: 6 });
    const dir = join(root, 'taken');
    await compressIntoBank(inputs, dir, { compress: { method: 'jd-full', maxError: 0.1, seed: 2 } });
    // options the compressor refuses: the output's error shows that it was checked first
    const bogus = { method: 'bogus' as never };
    await expect(compressIntoBank(inputs, dir, { compress: bogus })).rejects.toMatchObject({ code: 'BANK_CONFLICT', message: expect.stringContaining('a bank already exists here') });
    await expect(compressIntoBank(inputs, join(root, 'fresh-out'), { compress: bogus })).rejects.toMatchObject({ code: 'CONFIG' });
    const file = join(root, 'plain-file');
    await writeFile(file, 'x');
    await expect(compressIntoBank(inputs, file, { compress: bogus })).rejects.toMatchObject({ code: 'FILE_IO', message: `${file}: is a file, not a bank folder` });
    await expect(compressIntoBank(inputs, join(file, 'sub', 'bank'), { compress: bogus })).rejects.toMatchObject({ code: 'FILE_IO', message: expect.stringContaining(`(${file} is a file)`) });
  });

  it("a folder holding files that are not a bank's is refused, replace or not (the bank's garbage collection would delete them)", async () => {
    const inputs = syntheticAdapterSet({ slots: SLOTS, count: 2, rank: 4, sharedRank: 2, seed: 6 });
    const project = join(root, 'project');
    await mkdir(join(project, 'adapters'), { recursive: true });
    await writeFile(join(project, 'adapters', 'my_style_lora.safetensors'), 'precious');
    await writeFile(join(project, 'notes.txt'), 'precious');
    for (const replace of [false, true]) {
      await expect(compressIntoBank(inputs, project, { replace, compress: { method: 'jd-full', maxError: 0.1, seed: 2 } })).rejects.toMatchObject({
        code: 'CONFIG',
        message: `${project} already holds files that are not a bank's (adapters/my_style_lora.safetensors, notes.txt); choose a new or empty folder`,
      });
    }
    expect(await readFile(join(project, 'adapters', 'my_style_lora.safetensors'), 'utf8')).toBe('precious');
    // what an interrupted first write leaves (its lock, temp and data files) is a bank's: written over
    const interrupted = join(root, 'interrupted');
    await mkdir(join(interrupted, 'bases'), { recursive: true });
    await writeFile(join(interrupted, 'bases', 'c0.0123456789abcdef.safetensors'), 'x');
    await writeFile(join(interrupted, '.manifest.json.tmp-12-ab'), 'x');
    await compressIntoBank(inputs, interrupted, { compress: { method: 'jd-full', maxError: 0.1, seed: 2 } });
    expect((await openBank(interrupted)).manifest.adapters).toHaveLength(2);
  });
});

