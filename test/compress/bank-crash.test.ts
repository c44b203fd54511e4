/**
 * Crash safety: a child process keeps changing a bank (bank add, compress --force, refit) and is
 * killed with SIGKILL at seeded random moments; after each kill the bank must open and validate
 * completely (the previous or a newer version, never a broken one), and the next writer must take
 * over the dead writer's lock.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { openBank } from '../../src/compress/bank-reader.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { Random } from '../../src/tensor/random.js';

const SLOTS = [
  { path: 'model.layers.0.self_attn.q_proj', inFeatures: 48, outFeatures: 48 },
  { path: 'model.layers.0.mlp.down_proj', inFeatures: 96, outFeatures: 48 },
  { path: 'model.layers.1.self_attn.q_proj', inFeatures: 48, outFeatures: 48 },
];

const CHILD = `
import { addToBank } from './src/compress/bank-add.js';
import { compressIntoBank } from './src/compress/bank-compress.js';
import { refitBank } from './src/compress/bank-refit.js';
import { syntheticAdapterSet } from './src/compress/synthetic-adapters.js';
import { existsSync } from 'node:fs';
const [dir, seedText, slotsJson] = process.argv.slice(2);
const seed = Number(seedText);
const slots = JSON.parse(slotsJson);
const family = syntheticAdapterSet({ slots, count: 6, rank: 4, sharedRank: 3, noise: 0.05, seed: 1 });
process.stdout.write('ready\\n');
for (let i = 0; ; i++) {
  const op = existsSync(dir + '/manifest.json') ? (seed + i) % 3 : 1;
  if (op === 0) {
    const extra = syntheticAdapterSet({ slots, count: 1, rank: 4, sharedRank: 0, seed: seed * 1000 + i })[0].adapter;
    await addToBank(dir, 'extra-' + seed + '-' + i, extra, { maxError: 0.1 });
  } else if (op === 1) {
    await compressIntoBank(family.slice(0, 3 + (i % 4)), dir, { compress: { method: 'jd-full', maxError: 0.1, seed: i }, replace: true });
  } else {
    await refitBank(dir);
  }
  process.stdout.write('committed ' + i + '\\n');
}
`;

let root: string;
let compiled: string;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-bank-crash-'));
  compiled = join(root, 'js');
  // Node 20 cannot run TypeScript: compile the bank's import closure (no type check) for the child.
  const tsc = resolve('node_modules/typescript/bin/tsc');
  const files = ['bank-add', 'bank-compress', 'bank-refit', 'synthetic-adapters'].map((f) => `src/compress/${f}.ts`);
  await promisify(execFile)(process.execPath, [tsc, '--outDir', compiled, '--rootDir', '.', '--module', 'NodeNext', '--moduleResolution', 'NodeNext',
    '--target', 'ES2022', '--skipLibCheck', '--noCheck', '--types', 'node', ...files]);
  await writeFile(join(compiled, 'package.json'), '{"type":"module"}\n');
  await writeFile(join(compiled, 'child.mjs'), CHILD);
}, 120_000);

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Runs the child until it has started (or made its first commit), waits `delayMs`, kills it with SIGKILL; resolves with its commit count. */
function runAndKill(dir: string, seed: number, delayMs: number, after: 'ready' | 'committed'): Promise<{ commits: number; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [join(compiled, 'child.mjs'), dir, String(seed), JSON.stringify(SLOTS)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timer: NodeJS.Timeout | null = null;
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (timer === null && stdout.includes(`${after === 'ready' ? 'ready' : 'committed 0'}\n`)) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString(); });
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (signal !== 'SIGKILL') reject(new Error(`child exited with ${code} before the kill: ${stderr}`));
      else resolvePromise({ commits: (stdout.match(/committed/g) ?? []).length, stderr });
    });
  });
}

async function expectIntact(dir: string): Promise<number> {
  const bank = await openBank(dir);
  expect(await bank.verifyFiles()).toEqual([]);
  for (const id of bank.ids()) await bank.loadAdapter(id);
  return bank.manifest.generation;
}

describe('bank crash safety', () => {
  it('survives SIGKILL at random points during add, compress --force and refit', async () => {
    const dir = join(root, 'bank');
    const random = new Random(2024);
    let generation = 0;
    let commits = 0;
    for (let kill = 0; kill < 6; kill++) {
      // the first child is killed only after its first commit, so a bank exists however slow the machine is
      const result = await runAndKill(dir, kill, 30 + random.int(600), kill === 0 ? 'committed' : 'ready');
      commits += result.commits;
      const now = await expectIntact(dir);
      expect(now).toBeGreaterThanOrEqual(generation);
      generation = now;
    }
    expect(commits).toBeGreaterThan(0);
    // the next writer takes over the dead writer's lock and collects its leftovers
    const extra = syntheticAdapterSet({ slots: SLOTS, count: 1, rank: 4, sharedRank: 0, seed: 5 })[0]!.adapter;
    const added = await addToBank(dir, 'after-the-crashes', extra);
    expect(added.manifest.generation).toBe(generation + 1);
    await expectIntact(dir);
    const leftovers = [...(await readdir(dir)), ...(await readdir(join(dir, 'adapters'))), ...(await readdir(join(dir, 'bases')))].filter((n) => n.includes('.tmp-') || n === '.lock');
    expect(leftovers).toEqual([]);
  }, 120_000);
});
