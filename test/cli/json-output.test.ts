/**
 * Every --json output of the CLI (and report.json) spells its field names in snake_case, as the server's wire
 * formats do; keys that are data (module paths) stay as they are.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BASE_SHAPES } from '../../src/io/fixtures/base-shapes.js';
import { writeGeneratedAdapters } from '../../src/io/fixtures/generate-adapters.js';
import { snakeCaseKeys } from '../../src/io/snake-case-keys.js';
import { runCli } from './cli-capture.js';

let root = '';
let adapters: string[] = [];
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-cli-json-'));
  adapters = await writeGeneratedAdapters(join(root, 'a'), 4, { base: BASE_SHAPES.tiny, rank: 4, targets: ['q_proj'], sharedRank: 3, noise: 0.05, seed: 1 });
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});
afterEach(() => {
  process.exitCode = undefined;
});

/** Every object key in `value` that is a camelCase identifier, with where it is. */
function camelKeys(value: unknown, at = '$'): string[] {
  if (Array.isArray(value)) return value.flatMap((v, i) => camelKeys(v, `${at}[${i}]`));
  if (value === null || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([key, v]) => [...(/^[a-z][a-z0-9]*[A-Z]/.test(key) ? [`${at}.${key}`] : []), ...camelKeys(v, `${at}.${key}`)]);
}

describe('--json outputs', () => {
  it('snakeCaseKeys turns camelCase names into snake_case, keeps data keys and typed arrays, and spells non-finite numbers', () => {
    expect(snakeCaseKeys({ metadata: { trainedBy: 'alice' }, config: { torchDtype: 'x' }, sizeBytes: 1 })).toEqual({ metadata: { trainedBy: 'alice' }, config: { torchDtype: 'x' }, size_bytes: 1 });
    expect(snakeCaseKeys({ maxError: 1, perSlot: { 'model.layers.0.self_attn.q_proj': { relativeError: Infinity } }, 'lora_A.weight': [{ top1Agreement: Number.NaN }], rawF32: 2, id: 'userA' }))
      .toEqual({ max_error: 1, per_slot: { 'model.layers.0.self_attn.q_proj': { relative_error: 'Infinity' } }, 'lora_A.weight': [{ top1_agreement: 'NaN' }], raw_f32: 2, id: 'userA' });
  });

  it('compress, bank add, bank ls, verify, inspect, info and report.json have no camelCase keys', async () => {
    const bank = join(root, 'bank');
    const outputs: [string, unknown][] = [];
    const json = async (args: string[]): Promise<void> => {
      const result = await runCli(args);
      expect(result.code, `${args.join(' ')}: ${result.stderr}`).toBe(0);
      outputs.push([args.slice(0, 2).join(' '), JSON.parse(result.stdout)]);
    };
    await json(['compress', ...adapters.slice(0, 3), '-o', bank, '--max-error', '0.2', '--json']);
    await json(['bank', 'add', bank, adapters[3]!, '--json']);
    await json(['bank', 'ls', bank, '--json']);
    await json(['verify', bank, '--adapters', ...adapters, '--json']);
    await json(['inspect', adapters[0]!, '--json']);
    await json(['info', '--json']);
    expect((await runCli(['report', bank, '-o', join(root, 'report.html')])).code).toBe(0);
    outputs.push(['report.json', JSON.parse(await readFile(join(root, 'report.json'), 'utf8'))]);
    for (const [command, value] of outputs) expect(camelKeys(value), command).toEqual([]);
    const verified = outputs.find(([command]) => command.startsWith('verify'))![1] as { over_budget: string[]; max_error_budget: number };
    expect(verified).toMatchObject({ over_budget: [], max_error_budget: 0.2 });
  });
});
