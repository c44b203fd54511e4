import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openBank, reconstructAdapter } from '../../src/compress/bank-reader.js';
import { loadLoraAdapter } from '../../src/io/load-lora-adapter.js';
import { writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { generateModel } from '../../src/io/fixtures/generate-model.js';
import type { LoraModule } from '../../src/io/lora-types.js';
import { runCli } from './cli-capture.js';

let root: string;
let family: string[];
let stranger: string[];

function dense(b: Float32Array, a: Float32Array, rank: number, out: number, inFeatures: number, scale: number): Float64Array {
  const d = new Float64Array(out * inFeatures);
  for (let o = 0; o < out; o++) for (let p = 0; p < rank; p++) {
    const x = scale * b[o * rank + p]!;
    for (let i = 0; i < inFeatures; i++) d[o * inFeatures + i]! += x * a[p * inFeatures + i]!;
  }
  return d;
}
const denseOf = (m: LoraModule): Float64Array => dense(m.b, m.a, m.rank, m.outFeatures, m.inFeatures, m.scale);
function relative(x: Float64Array, y: Float64Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < x.length; i++) { num += (x[i]! - y[i]!) ** 2; den += x[i]! ** 2; }
  return Math.sqrt(num / den);
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-cli-compress-'));
  const base = { base: BASE_SHAPES.tiny, rank: 4, targets: ['q_proj', 'down_proj'], noise: 0.05 };
  family = await writeGeneratedAdapters(join(root, 'family'), 5, { ...base, sharedRank: 3, seed: 1 });
  stranger = await writeGeneratedAdapters(join(root, 'stranger'), 1, { ...base, sharedRank: 0, seed: 77 });
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
afterEach(() => {
  process.exitCode = undefined;
});

describe('soppu compress / bank / verify / export / report', () => {
  it('has --help for every command', async () => {
    for (const args of [['compress'], ['bank', 'add'], ['bank', 'rm'], ['bank', 'refit'], ['bank', 'ls'], ['verify'], ['export'], ['report']]) {
      const r = await runCli([...args, '--help']);
      expect(r.code, args.join(' ')).toBe(0);
      expect(r.stdout).toMatch(/Usage: soppu/);
    }
  });

  it('bank add --replace swaps an adapter in place; bank rm takes one out', async () => {
    const bank = join(root, 'bank-rm');
    expect((await runCli(['compress', ...family.slice(0, 3), '-o', bank, '--max-error', '0.15', '--seed', '5'])).code).toBe(0);
    const replaced = await runCli(['bank', 'add', bank, family[4]!, '--id', 'user-0001', '--replace']);
    expect(replaced.stderr).toBe('');
    expect(replaced.stdout).toMatch(/added user-0001/);
    const listed = JSON.parse((await runCli(['bank', 'ls', bank, '--json'])).stdout);
    expect(listed.adapters.map((a: { id: string }) => a.id)).toEqual(['user-0000', 'user-0001', 'user-0002']);
    expect((await openBank(bank)).manifest.adapters.find((a) => a.id === 'user-0001')!.addedBy).toBe('add');
    // id=dir, as compress and verify take adapters
    const named = await runCli(['bank', 'add', bank, `alice=${family[3]!}`]);
    expect(named.stdout).toMatch(/^added alice to .*\(budget 0\.15\)/);
    expect((await openBank(bank)).ids()).toContain('alice');
    expect((await runCli(['bank', 'rm', bank, 'alice'])).code).toBe(0);
    const removed = await runCli(['bank', 'rm', bank, 'user-0000']);
    expect(removed.stdout).toMatch(/removed user-0000 from .*: 2 adapter\(s\) left/);
    expect((await openBank(bank)).ids()).toEqual(['user-0001', 'user-0002']);
    const again = await runCli(['bank', 'rm', bank, 'user-0000']);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/ADAPTER_NOT_FOUND.*no adapter "user-0000"/);
    process.exitCode = undefined;
  });

  it('compresses, lists, adds, verifies (paired by id), exports, reports and refits', async () => {
    const bank = join(root, 'bank');
    const compressed = await runCli(['compress', ...family.slice(0, 4), '-o', bank, '--max-error', '0.15', '--seed', '5']);
    expect(compressed.stderr).toBe('');
    expect(compressed.code).toBe(0);
    expect(compressed.stdout).toMatch(/4 adapters, 4 slots, 1 cluster\(s\), jd-full/);
    expect(compressed.stdout).toMatch(/parameters: .* raw → .* stored \([\d.]+×/);
    expect(compressed.stdout).toMatch(/worst adapters: user-000\d/);

    const again = await runCli(['compress', family[0]!, '-o', bank]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/BANK_CONFLICT.*--force/);
    const duplicate = await runCli(['compress', family[0]!, family[0]!, '-o', join(root, 'dup')]);
    expect(duplicate.stderr).toMatch(/CONFIG.*"user-0000" is given twice/);

    const ls = JSON.parse((await runCli(['bank', 'ls', bank, '--json'])).stdout);
    expect(ls.adapters.map((a: { id: string }) => a.id)).toEqual(['user-0000', 'user-0001', 'user-0002', 'user-0003']);
    expect(ls.adapters[0].slots[0]).toEqual(expect.objectContaining({ path: 'model.layers.0.mlp.down_proj', storage: expect.stringMatching(/compressed|raw/) }));

    const added = await runCli(['bank', 'add', bank, family[4]!]);
    expect(added.code).toBe(0);
    expect(added.stdout).toMatch(/added user-0004/);
    const addedStranger = await runCli(['bank', 'add', bank, stranger[0]!, '--id', 'stranger']);
    expect(addedStranger.stdout).toMatch(/kept raw: .*projection-over-budget/);
    expect(addedStranger.stdout).toMatch(/refit advised/);
    expect((await runCli(['bank', 'add', bank, stranger[0]!, '--id', 'stranger'])).stderr).toMatch(/BANK_CONFLICT/);
    const text = (await runCli(['bank', 'ls', bank])).stdout;
    expect(text).toMatch(/stranger {2}cluster 0/);
    expect(text).toMatch(/raw r=4 {2}error 0\.0000 {2}\(projection-over-budget\)/);

    const sources = [...family.map((d) => d), `stranger=${stranger[0]}`];
    const verified = await runCli(['verify', bank, '--adapters', ...sources]);
    expect(verified.stderr).toBe('');
    expect(verified.code).toBe(0);
    expect(verified.stdout).toMatch(/measured against 6 original/);
    // swap two ids: the pairing is by id, so both are reported far over budget
    const swapped = await runCli(['verify', bank, '--adapters', `user-0000=${family[1]}`, `user-0001=${family[0]}`, '--json']);
    expect(swapped.code).toBe(1);
    expect(JSON.parse(swapped.stdout).over_budget.sort()).toEqual(['user-0000', 'user-0001']);
    process.exitCode = undefined; // main() reports process.exitCode; in process it outlives the command

    const out = join(root, 'exported');
    expect((await runCli(['export', bank, 'user-0002', '-o', out])).code).toBe(0);
    const exported = await loadLoraAdapter(out);
    const opened = await openBank(bank);
    const reconstruction = await reconstructAdapter(opened, 'user-0002');
    const original = await loadLoraAdapter(family[2]!);
    expect([...exported.modules.keys()]).toEqual([...reconstruction.keys()]);
    for (const [path, module] of exported.modules) {
      const r = reconstruction.get(path)!;
      expect(relative(dense(r.b, r.a, r.rank, r.outFeatures, r.inFeatures, 1), denseOf(module))).toBeLessThan(1e-6);
      // and it is close to the original within the bank's recorded error
      expect(relative(denseOf(original.modules.get(path)!), denseOf(module))).toBeCloseTo(opened.adapter('user-0002').perSlot[path]!.relativeError, 4);
    }
    const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
    expect(config).toEqual(expect.objectContaining({ peft_type: 'LORA', use_rslora: false, target_modules: ['down_proj', 'q_proj'] }));
    expect((await runCli(['export', bank, 'user-0002', '-o', join(root, 'bf16'), '--dtype', 'bf16'])).code).toBe(0);
    expect((await loadLoraAdapter(join(root, 'bf16'))).sourceDtype).toBe('BF16');
    expect((await runCli(['export', bank, 'nobody', '-o', join(root, 'x')])).stderr).toMatch(/ADAPTER_NOT_FOUND.*"nobody"/);
    // a folder that already holds files (here the export above) is not written over without --force
    const before = await readFile(join(out, 'adapter_model.safetensors'));
    const refused = await runCli(['export', bank, 'user-0001', '-o', out]);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain(`-o ${out} already holds files (adapter_config.json, adapter_model.safetensors); choose a new or empty folder, or pass --force to write into it`);
    expect(await readFile(join(out, 'adapter_model.safetensors'))).toEqual(before);
    expect((await runCli(['export', bank, 'user-0001', '-o', out, '--force'])).code).toBe(0);
    expect(await readFile(join(out, 'adapter_model.safetensors'))).not.toEqual(before);
    process.exitCode = undefined;

    const html = join(root, 'report.html');
    const reported = await runCli(['report', bank, '-o', html]);
    expect(reported.code).toBe(0);
    const page = await readFile(html, 'utf8');
    expect(page.match(/<svg/g)!.length).toBeGreaterThanOrEqual(3);
    expect(page).not.toMatch(/(src|href)=["']?https?:/i);
    expect(page).not.toMatch(/url\(\s*["']?https?:/i);
    expect(page).not.toMatch(/<script|<link/i);
    expect(page).toMatch(/stranger/);
    const json = JSON.parse(await readFile(join(root, 'report.json'), 'utf8'));
    expect(json.adapters).toBe(6);
    expect(json.slots[0].errors).toHaveLength(6);

    // every source is unchanged: the refit reads them all, and the refitted bank meets the budget against them
    const refit = await runCli(['bank', 'refit', bank]);
    expect(refit.code).toBe(0);
    expect(refit.stdout).toMatch(/refitted 6 adapter\(s\) from their unchanged sources, 0 from the bank/);
    expect(refit.stdout).not.toMatch(/refit advised/);
    const after = await runCli(['verify', bank, '--adapters', ...sources, '--json']);
    expect(after.code).toBe(0);
    expect(JSON.parse(after.stdout).file_problems).toEqual([]);
    expect(JSON.parse(after.stdout).over_budget).toEqual([]);
    // a changed source is not trusted: --from sources refuses, auto falls back to the bank for that one
    await writeFile(join(family[3]!, 'adapter_model.safetensors'), await readFile(join(family[4]!, 'adapter_model.safetensors')));
    const strict = await runCli(['bank', 'refit', bank, '--from', 'sources']);
    expect(strict.stderr).toMatch(/adapter user-0003: cannot refit from its source: .*changed since it entered the bank/);
    const auto = await runCli(['bank', 'refit', bank]);
    expect(auto.stdout).toMatch(/refitted 5 adapter\(s\) from their unchanged sources, 1 from the bank's reconstruction \(user-0003\)/);
    const entry = JSON.parse(await readFile(join(bank, 'manifest.json'), 'utf8')).adapters.find((x: { id: string }) => x.id === 'user-0003');
    expect(entry.errorBasis).toBe('bound');
    // so is a source whose adapter_config.json changed (it sets every module's scale) or went away
    const editedConfigFile = join(family[1]!, 'adapter_config.json');
    const editedConfig = await readFile(editedConfigFile, 'utf8');
    await writeFile(editedConfigFile, editedConfig.replace(/"lora_alpha":\s*([\d.]+)/, (_m, alpha: string) => `"lora_alpha": ${Number(alpha) * 10}`));
    expect(await readFile(editedConfigFile, 'utf8')).not.toBe(editedConfig);
    const edited = await runCli(['bank', 'refit', bank, '--from', 'sources']);
    expect(edited.stderr).toMatch(/adapter user-0001: cannot refit from its source: .*adapter_config\.json changed since it entered the bank/);
    await rm(editedConfigFile);
    const gone = await runCli(['bank', 'refit', bank]);
    expect(gone.code).toBe(0);
    expect(gone.stdout).toMatch(/refitted 4 adapter\(s\) from their unchanged sources, 2 from the bank's reconstruction \(user-0001, user-0003\)/);
    await writeFile(editedConfigFile, editedConfig);
  });

  it('verify --model compares next-token distributions (KL, top-1): an exact bank agrees, a lossy one does not', async () => {
    const modelDir = join(root, 'model');
    await generateModel({ out: modelDir, shape: 'tiny', seed: 3 });
    const bank = join(root, 'exact-bank');
    // shared rank 12 = 3 adapters × r 4: the bank is exact
    expect((await runCli(['compress', ...family.slice(0, 3), '-o', bank, '--rank', '12', '--seed', '1'])).code).toBe(0);
    // f32 factors: the bank's math alone (auto would hold the bank in bf16 on this f32 model)
    const checked = await runCli(['verify', bank, '--adapters', ...family.slice(0, 2), '--model', modelDir, '--tokens', '6', '--json', '--lora-dtype', 'f32']);
    expect(checked.stderr).toBe('');
    expect(checked.code).toBe(0);
    const report = JSON.parse(checked.stdout);
    const withCheck = report.adapters.filter((a: { model_check?: { tokens: number } }) => a.model_check && a.model_check.tokens > 0);
    expect(withCheck.map((a: { id: string }) => a.id).sort()).toEqual(['user-0000', 'user-0001']);
    for (const a of withCheck) {
      expect(a.model_check.tokens).toBe(18);
      expect(a.model_check.top1_agreement).toBe(1);
      expect(a.model_check.mean_kl).toBeGreaterThanOrEqual(0);
      expect(a.model_check.max_kl).toBeLessThan(1e-5);
      expect(a.model_check.mean_logprob_gap).toBeLessThan(1e-3);
      expect(a.model_check.mean_logprob_gap).toBeGreaterThanOrEqual(0); // a magnitude
    }
    // auto, as serve holds it: one bf16 rounding of the exact bank, far below a lossy bank's gap (below)
    const asServed = JSON.parse((await runCli(['verify', bank, '--adapters', family[0]!, '--model', modelDir, '--tokens', '6', '--json'])).stdout);
    const servedCheck = asServed.adapters.find((a: { id: string }) => a.id === 'user-0000').model_check;
    const exactGap = withCheck.find((a: { id: string }) => a.id === 'user-0000').model_check.mean_logprob_gap;
    expect(servedCheck.mean_logprob_gap).toBeGreaterThan(exactGap); // the bank held in bf16 adds to the f32 fit's own gap
    expect(servedCheck.mean_logprob_gap).toBeLessThan(0.01);
    expect(servedCheck.top1_agreement).toBe(1);
    const refused = await runCli(['verify', bank, '--lora-dtype', 'bf16']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/--lora-dtype sets how the model check holds adapters: give --model/);
    const lossy = join(root, 'lossy-bank');
    expect((await runCli(['compress', ...family.slice(0, 3), '-o', lossy, '--rank', '1', '--seed', '1'])).code).toBe(0);
    const lossyReport = JSON.parse((await runCli(['verify', lossy, '--adapters', family[0]!, '--model', modelDir, '--tokens', '6', '--json'])).stdout);
    const lossyCheck = lossyReport.adapters.find((a: { id: string }) => a.id === 'user-0000').model_check;
    expect(lossyCheck.tokens).toBe(18);
    expect(lossyCheck.mean_kl).toBeGreaterThan(1e-3);
    expect(lossyCheck.max_kl).toBeGreaterThanOrEqual(lossyCheck.mean_kl);
    expect(lossyCheck.mean_logprob_gap).toBeGreaterThan(0.01);
    expect(lossyCheck.max_logprob_gap).toBeGreaterThanOrEqual(lossyCheck.mean_logprob_gap); // both |gap|: the mean cannot pass the max
    expect(lossyCheck.top1_agreement).toBeLessThan(1);
  }, 60_000);
});
