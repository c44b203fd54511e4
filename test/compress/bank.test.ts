import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { addToBank } from '../../src/compress/bank-add.js';
import { basesKeyOf, parseManifest, type BankManifest } from '../../src/compress/bank-manifest.js';
import { openBank, reconstructAdapter } from '../../src/compress/bank-reader.js';
import { refitBank } from '../../src/compress/bank-refit.js';
import { removeFromBank } from '../../src/compress/bank-remove.js';
import { writeBank, type AdapterExtras } from '../../src/compress/bank-writer.js';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import type { CompressionResult } from '../../src/compress/compression-types.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { verifyBank } from '../../src/compress/verify-bank.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';
import { denseDelta, relativeDenseError } from './method-helpers.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 24, outFeatures: 16 },
  { path: 'model.layers.1.mlp.down_proj', inFeatures: 20, outFeatures: 12 },
];

function denseOfFactors(b: Float32Array, a: Float32Array, rank: number, out: number, inFeatures: number): Float64Array {
  const d = new Float64Array(out * inFeatures);
  for (let o = 0; o < out; o++) for (let p = 0; p < rank; p++) for (let i = 0; i < inFeatures; i++) d[o * inFeatures + i]! += b[o * rank + p]! * a[p * inFeatures + i]!;
  return d;
}

async function expectCode(promise: Promise<unknown>, code: string, text?: RegExp): Promise<void> {
  try {
    await promise;
  } catch (e) {
    expect(isSoppuError(e), String(e)).toBe(true);
    expect((e as { code: string }).code).toBe(code);
    if (text) expect((e as Error).message).toMatch(text);
    return;
  }
  throw new Error(`expected ${code}`);
}

describe('adapter bank', () => {
  let root: string;
  let inputs: { id: string; adapter: LoraAdapter }[];
  let result: CompressionResult;
  const extras = new Map<string, AdapterExtras>();

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'soppu-bank-'));
    inputs = syntheticAdapterSet({ slots: SLOTS, count: 5, rank: 4, sharedRank: 3, noise: 0.05, seed: 7, normSpread: 4 });
    inputs[1]!.adapter.passthrough; // plain adapters have no passthrough; give one a head
    inputs[1] = { id: inputs[1]!.id, adapter: { ...inputs[1]!.adapter, passthrough: [{ name: 'base_model.model.score.weight', dtype: 'F32', shape: [2, 2], bytes: new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer) }] } };
    result = await compressAdapters(inputs.slice(0, 4), { method: 'jd-full', maxError: 0.2, clusters: 2, seed: 3 });
    for (const { id, adapter } of inputs) extras.set(id, { passthrough: adapter.passthrough, config: null });
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('writes a bank whose reconstruction matches the compression result, paired by id', async () => {
    const dir = join(root, 'a');
    const manifest = await writeBank(dir, result, extras);
    expect(manifest.adapters.map((a) => a.id)).toEqual(['adapter-0', 'adapter-1', 'adapter-2', 'adapter-3']);
    // one file per adapter, one bases file per cluster with bases
    const adapterFiles = await readdir(join(dir, 'adapters'));
    expect(adapterFiles).toHaveLength(4);
    const bank = await openBank(dir);
    expect(bank.ids()).toEqual(manifest.adapters.map((a) => a.id));
    for (const { id, adapter } of inputs.slice(0, 4)) {
      const recorded = bank.adapter(id);
      const rec = await reconstructAdapter(bank, id);
      for (const [path, module] of adapter.modules) {
        const r = rec.get(path)!;
        const dense = denseOfFactors(r.b, r.a, r.rank, r.outFeatures, r.inFeatures);
        const error = relativeDenseError(denseDelta(module), dense);
        expect(error).toBeCloseTo(recorded.perSlot[path]!.relativeError, 4);
        expect(error).toBeLessThanOrEqual(0.2 + 1e-4);
      }
    }
    expect(await bank.loadPassthrough('adapter-1')).toEqual([expect.objectContaining({ name: 'base_model.model.score.weight', shape: [2, 2] })]);
    const report = await verifyBank(bank, { sources: new Map(inputs.slice(0, 4).map((i) => [i.id, i.adapter])) });
    expect(report.fileProblems).toEqual([]);
    expect(report.overBudget).toEqual([]);
    for (const a of report.adapters) for (const s of a.slots) expect(s.relativeError).toBeCloseTo(s.recordedError!, 4);
    // worst first
    expect(report.adapters.map((a) => a.maxError)).toEqual([...report.adapters.map((a) => a.maxError)].sort((x, y) => y - x));
  });

  it('verify pairs sources by id: a swapped pair shows large errors', async () => {
    const dir = join(root, 'a');
    const bank = await openBank(dir);
    const swapped = new Map([['adapter-0', inputs[2]!.adapter], ['adapter-2', inputs[0]!.adapter]]);
    const report = await verifyBank(bank, { sources: swapped, maxError: 0.2 });
    expect([...report.overBudget].sort()).toEqual(['adapter-0', 'adapter-2']);
    await expect(verifyBank(bank, { sources: new Map([['nope', inputs[0]!.adapter]]) })).rejects.toThrow(/"nope" is not in the bank/);
  });

  it('refuses to overwrite a bank without replace; replace collects the old files', async () => {
    const dir = join(root, 'a');
    await expectCode(writeBank(dir, result, extras), 'BANK_CONFLICT');
    const before: BankManifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8'));
    const other = await compressAdapters(inputs.slice(0, 4), { method: 'jd-diag', rank: 3, seed: 3 });
    const oldReader = await openBank(dir);
    const after = await writeBank(dir, other, extras, { replace: true });
    expect(after.generation).toBe(before.generation + 1);
    const onDisk = async (): Promise<string[]> => [...(await readdir(join(dir, 'adapters'))).map((n) => `adapters/${n}`), ...(await readdir(join(dir, 'bases'))).map((n) => `bases/${n}`)].sort();
    // the previous generation's files stay one generation longer (readers that opened it keep working)
    expect(await onDisk()).toEqual([...new Set([...Object.keys(after.files), ...Object.keys(before.files)])].sort());
    await reconstructAdapter(oldReader, 'adapter-0'); // a reader of the previous generation still loads
    const third = await writeBank(dir, other, extras, { replace: true, addedBy: 'refit' });
    expect(await onDisk()).toEqual(Object.keys(third.files).sort());
    const bank = await openBank(dir);
    const compressed = [];
    for (const id of bank.ids()) for (const part of (await bank.loadAdapter(id)).slots.values()) if (part.kind === 'compressed') compressed.push(part);
    expect(compressed.length).toBeGreaterThan(0);
    for (const part of compressed) expect(part.diagonal && part.core.length === part.rank).toBe(true);
  });

  it('a damaged bases file fails the loads of its cluster, naming the file and what is wrong (checked streaming, not read whole)', async () => {
    const dir = join(root, 'bases-damage');
    const manifest = await writeBank(dir, result, extras);
    const slot = manifest.slots.find((s) => s.ranks.some((r) => r !== null))!;
    const cluster = slot.ranks.findIndex((r) => r !== null);
    const basesFile = join(dir, manifest.basesFiles[cluster]!);
    const good = await readFile(basesFile);
    const load = async () => (await openBank(dir)).loadBases(basesKeyOf(cluster, slot.path));
    await expect(load()).resolves.toMatchObject({ path: slot.path });
    const flipped = new Uint8Array(good);
    flipped[flipped.length - 1] = flipped[flipped.length - 1]! ^ 0xff;
    await writeFile(basesFile, flipped);
    await expectCode(load(), 'BANK_CORRUPT', /sha256 [0-9a-f]{64} does not match the manifest's/);
    expect((await (await openBank(dir)).verifyFiles()).map((e) => e.message)).toContainEqual(expect.stringMatching(/cluster-.*sha256 [0-9a-f]{64} does not match/));
    await writeFile(basesFile, good.subarray(0, 100));
    await expectCode(load(), 'BANK_CORRUPT', /is 100 bytes, the manifest records/);
    await rm(basesFile);
    await expectCode(load(), 'BANK_CORRUPT', /data file named by the manifest is missing/);
    await writeFile(basesFile, good);
    await expect(load()).resolves.toMatchObject({ path: slot.path });
  });

  it('names what is wrong: checksum, size, missing tensor, bad manifest fields', async () => {
    const dir = join(root, 'b');
    const manifest = await writeBank(dir, result, extras);
    const file = manifest.adapters.find((a) => a.id === 'adapter-2')!.file!;
    const bytes = await readFile(join(dir, file));
    bytes[bytes.length - 1] = bytes[bytes.length - 1]! ^ 0xff;
    await writeFile(join(dir, file), bytes);
    const bank = await openBank(dir);
    await expectCode(bank.loadAdapter('adapter-2'), 'BANK_CORRUPT', /sha256/);
    await bank.loadAdapter('adapter-1'); // the others still load
    expect((await bank.verifyFiles()).map((e) => e.context.file)).toEqual([join(dir, file)]);
    // a truncated or missing file fails only the adapter that reads it: the bank opens, the others load
    await writeFile(join(dir, file), bytes.subarray(0, 10));
    const reopened = await openBank(dir);
    await expectCode(reopened.loadAdapter('adapter-2'), 'BANK_CORRUPT', /is 10 bytes, the manifest records/);
    await reopened.loadAdapter('adapter-1');
    await rm(join(dir, file));
    const withoutFile = await openBank(dir);
    await expectCode(withoutFile.loadAdapter('adapter-2'), 'BANK_CORRUPT', /adapter-2.*: data file named by the manifest is missing/);
    await withoutFile.loadAdapter('adapter-1');
    expect((await withoutFile.verifyFiles()).map((e) => e.message)).toEqual([expect.stringMatching(/data file named by the manifest is missing/)]);
    // and it can be removed, which leaves a bank with no problem
    await removeFromBank(dir, 'adapter-2');
    expect(await (await openBank(dir)).verifyFiles()).toEqual([]);
    await expectCode(bank.loadAdapter('missing-id'), 'ADAPTER_NOT_FOUND');

    const text = await readFile(join(dir, 'manifest.json'), 'utf8');
    const bad = (mutate: (m: Record<string, any>) => void): string => { const m = JSON.parse(text); mutate(m); return JSON.stringify(m); };
    expect(() => parseManifest(bad((m) => { m.formatVersion = 99; }), 'm.json')).toThrow(/formatVersion: version 99 is newer/);
    expect(() => parseManifest(bad((m) => { m.adapters[0].cluster = 5; }), 'm.json')).toThrow(/adapters\["adapter-0"\]\.cluster/);
    expect(() => parseManifest(bad((m) => { m.adapters[0].file = 'adapters/x.safetensors'; }), 'm.json')).toThrow(/not listed in files/);
    expect(() => parseManifest(bad((m) => { m.slots[0].inFeatures = 'x'; }), 'm.json')).toThrow(/slots\[0\]\.inFeatures/);
    expect(() => parseManifest('{', 'm.json')).toThrow(/not valid JSON/);
    // shape mismatch between manifest and file
    const dir2 = join(root, 'c');
    await writeBank(dir2, result, extras);
    const m2 = JSON.parse(await readFile(join(dir2, 'manifest.json'), 'utf8'));
    const a0 = m2.adapters.find((a: any) => Object.values(a.perSlot).some((p: any) => p.storage === 'compressed'));
    const [path, slot] = Object.entries(a0.perSlot).find(([, p]: any) => p.storage === 'compressed') as [string, any];
    const s = m2.slots.find((x: any) => x.path === path);
    const wrongRank = slot.rank + 1;
    s.ranks[a0.cluster] = wrongRank;
    for (const a of m2.adapters) for (const [p, e] of Object.entries(a.perSlot) as [string, any][]) if (p === path && a.cluster === a0.cluster && e.storage === 'compressed') e.rank = wrongRank;
    await writeFile(join(dir2, 'manifest.json'), JSON.stringify(m2));
    await expectCode((await openBank(dir2)).loadAdapter(a0.id), 'BANK_CORRUPT', new RegExp(`tensor "${path.replace(/\./g, '\\.')}\\.core" has shape`));
  });

  it('a crashed writer leaves only orphans: the bank still opens, and the next writer takes the lock and collects them', async () => {
    const dir = join(root, 'e');
    const manifest = await writeBank(dir, result, extras);
    const { spawnSync } = await import('node:child_process');
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString();
    await writeFile(join(dir, '.lock'), `${dead}\n`);
    await writeFile(join(dir, 'adapters', 'orphan.0123456789abcdef.safetensors'), 'half a file');
    await writeFile(join(dir, 'adapters', `.x.safetensors.tmp-${dead}-abcdef`), 'partial');
    await writeFile(join(dir, `.manifest.json.tmp-${dead}-abcdef`), '{"trunc');
    const bank = await openBank(dir);
    expect(await bank.verifyFiles()).toEqual([]);
    const added = await addToBank(dir, 'late', inputs[4]!.adapter);
    expect(added.manifest.generation).toBe(manifest.generation + 1);
    const names = [...await readdir(dir), ...await readdir(join(dir, 'adapters'))];
    expect(names.filter((n) => n.includes('tmp-') || n.startsWith('orphan') || n === '.lock')).toEqual([]);
    // a live writer's lock is respected
    await writeFile(join(dir, '.lock'), `${process.ppid}\n`);
    await expectCode(addToBank(dir, 'blocked', inputs[4]!.adapter), 'BANK_CONFLICT', /being changed by process/);
    await rm(join(dir, '.lock'));
  });

  it('bank add projects a new adapter; an unrelated one is kept raw and a refit is advised; refit clears it', async () => {
    const dir = join(root, 'd');
    await writeBank(dir, result, extras);
    const added = await addToBank(dir, 'family-member', inputs[4]!.adapter);
    expect(added.entry.addedBy).toBe('add');
    const stranger = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 0, seed: 99 })[0]!.adapter;
    const strangerResult = await addToBank(dir, 'stranger', stranger, { maxError: 0.2 });
    expect(strangerResult.rawSlots.length).toBeGreaterThan(0);
    expect(strangerResult.manifest.refitAdvised).toBe(true);
    expect(strangerResult.manifest.refitReasons.join()).toMatch(/stranger/);
    await expectCode(addToBank(dir, 'stranger', stranger), 'BANK_CONFLICT');
    // the prefix the engine gives adapters requests name by directory is not a bank id
    await expectCode(addToBank(dir, '@local:/srv/x', stranger), 'CONFIG', /starts with @local:/);
    const bank = await openBank(dir);
    const sources = new Map([...inputs.slice(0, 5).map((i, k) => [k === 4 ? 'family-member' : i.id, i.adapter] as const), ['stranger', stranger] as const]);
    const report = await verifyBank(bank, { sources, maxError: 0.2 });
    expect(report.overBudget).toEqual([]);
    const exact = report.adapters.find((a) => a.id === 'stranger')!;
    for (const s of exact.slots) if (s.storage === 'raw') expect(s.relativeError).toBeLessThan(1e-5);

    const { manifest: refitted, fromBank } = await refitBank(dir);
    expect(fromBank).toHaveLength(6); // in-memory adapters have no source on disk
    expect(refitted.adapters).toHaveLength(6);
    expect(refitted.adapters.every((a) => a.addedBy === 'refit' && a.errorBasis === 'bound')).toBe(true);
    expect(refitted.refitAdvised).toBe(false);
    const after = await verifyBank(await openBank(dir), { sources });
    for (const a of after.adapters) for (const s of a.slots) expect(s.relativeError).toBeLessThanOrEqual(s.recordedError! + 1e-4);
  });
});
