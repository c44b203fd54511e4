/**
 * The bank's writer lock: callers in one process queue; a lock file is never seen empty; a dead writer's
 * lock is taken over once even when several writers race for it (child processes); a live one's is a
 * BANK_CONFLICT. And the user-visible case: two adapters added to one bank at once both land.
 */
import { createHash } from 'node:crypto';
import { execFile, spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addToBank } from '../../src/compress/bank-add.js';
import { withBankLock } from '../../src/compress/bank-lock.js';
import { parseManifest } from '../../src/compress/bank-manifest.js';
import { writeBank, type AdapterExtras } from '../../src/compress/bank-writer.js';
import { compressAdapters } from '../../src/compress/compress-adapters.js';
import { syntheticAdapterSet } from '../../src/compress/synthetic-adapters.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';

const sleep = (ms: number): Promise<void> => new Promise((done) => setTimeout(done, ms));

/** A pid no process has: a child that has exited. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', '']);
  await new Promise((done) => child.on('exit', done));
  return child.pid!;
}

/** Asserts the enter/exit lines of a log never interleave: every enter is followed by its own exit. */
function expectSerial(lines: readonly string[]): void {
  for (let i = 0; i < lines.length; i += 2) {
    const [enter, exit] = [lines[i]!, lines[i + 1]];
    expect(enter.startsWith('enter '), `line ${i}: ${enter}`).toBe(true);
    expect(exit, `line ${i + 1} after ${enter}`).toBe(enter.replace('enter ', 'exit '));
  }
}

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-bank-lock-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('bank lock', () => {
  it('makes the folder only for a new bank: a mistyped bank path is FILE_NOT_FOUND and is not left behind; a file is FILE_IO', async () => {
    const typo = join(root, 'bnak');
    await expect(withBankLock(typo, async () => 'ran')).rejects.toMatchObject({ code: 'FILE_NOT_FOUND', message: `${join(typo, 'manifest.json')}: no bank here (the folder ${typo} does not exist)` });
    await expect(readdir(typo)).rejects.toMatchObject({ code: 'ENOENT' });
    const file = join(root, 'a-file');
    await writeFile(file, 'x');
    await expect(withBankLock(file, async () => 'ran')).rejects.toMatchObject({ code: 'FILE_IO', message: `${file}: is a file, not a bank folder` });
    await expect(withBankLock(join(file, 'bank'), async () => 'ran', { create: true })).rejects.toMatchObject({ code: 'FILE_IO', message: expect.stringContaining(`${join(file, 'bank')}: cannot create the bank folder`) });
    expect(await withBankLock(join(root, 'new-bank'), async () => 'ran', { create: true })).toBe('ran');
  });

  it('queues the callers of one process on one bank, in order, and holds a whole lock file while each runs', async () => {
    const dir = join(root, 'queue');
    await mkdir(dir);
    const log: string[] = [];
    const held: string[] = [];
    const calls = Array.from({ length: 5 }, (_, i) =>
      withBankLock(dir, async () => {
        log.push(`enter ${i}`);
        held.push(await readFile(join(dir, '.lock'), 'utf8'));
        await sleep(5);
        log.push(`exit ${i}`);
        return i;
      }),
    );
    expect(await Promise.all(calls)).toEqual([0, 1, 2, 3, 4]);
    expectSerial(log);
    expect(log.filter((line) => line.startsWith('enter'))).toEqual([0, 1, 2, 3, 4].map((i) => `enter ${i}`));
    for (const content of held) expect(content).toMatch(new RegExp(`^${process.pid} [0-9a-f]{16}\\n$`));
    expect(new Set(held).size).toBe(5);
    expect(await readdir(dir)).toEqual([]);
  });

  it('releases the lock when the holder throws, and the next caller runs', async () => {
    const dir = join(root, 'throws');
    await mkdir(dir);
    const failing = withBankLock(dir, async () => {
      throw new Error('holder failed');
    });
    const next = withBankLock(dir, async () => 'ran');
    await expect(failing).rejects.toThrow('holder failed');
    expect(await next).toBe('ran');
    expect(await readdir(dir)).toEqual([]);
  });

  it("takes over a dead writer's lock (and an empty one); refuses a live process's with BANK_CONFLICT naming it", async () => {
    const dir = join(root, 'stale');
    await mkdir(dir, { recursive: true });
    const dead = await deadPid();
    await writeFile(join(dir, '.lock'), `${dead}\n`);
    expect(await withBankLock(dir, async () => (await readFile(join(dir, '.lock'), 'utf8')).split(' ')[0])).toBe(String(process.pid));
    await writeFile(join(dir, '.lock'), '');
    expect(await withBankLock(dir, async () => 'taken')).toBe('taken');
    // a live holder (this test's parent process)
    await writeFile(join(dir, '.lock'), `${process.ppid} 0123456789abcdef\n`);
    const refused = await withBankLock(dir, async () => 'ran').catch((e: unknown) => e);
    expect(isSoppuError(refused), String(refused)).toBe(true);
    expect((refused as { code: string }).code).toBe('BANK_CONFLICT');
    expect((refused as Error).message).toContain(`process ${process.ppid}`);
    expect(await readFile(join(dir, '.lock'), 'utf8')).toBe(`${process.ppid} 0123456789abcdef\n`); // left alone
  });

  it("takes over a dead lock whose takeover a killed writer left unfinished (its marker stays), and clears the markers", async () => {
    const dir = join(root, 'dead-takeover');
    await mkdir(dir, { recursive: true });
    const seen = `${await deadPid()} 00000000000000aa\n`;
    await writeFile(join(dir, '.lock'), seen);
    const hash = createHash('sha256').update(seen).digest('hex').slice(0, 16);
    // two writers died taking it over, one after the other
    await writeFile(join(dir, `.lock.tmp-0-${hash}`), `${await deadPid()} 00000000000000bb\n`);
    await writeFile(join(dir, `.lock.tmp-1-${hash}`), `${await deadPid()} 00000000000000cc\n`);
    expect(await withBankLock(dir, async () => (await readFile(join(dir, '.lock'), 'utf8')).split(' ')[0])).toBe(String(process.pid));
    expect(await readdir(dir)).toEqual([]);
    // a live writer's marker: that writer is taking it over, so this one gives up
    await writeFile(join(dir, '.lock'), seen);
    await writeFile(join(dir, `.lock.tmp-0-${hash}`), `${process.ppid} 00000000000000dd\n`);
    await expect(withBankLock(dir, async () => 'ran')).rejects.toMatchObject({ code: 'BANK_CONFLICT' });
  });

  it('queues the callers of one process that name one bank by two paths (a symlink), and never takes over its own live lock', async () => {
    const dir = join(root, 'aliased');
    await mkdir(dir, { recursive: true });
    await symlink(dir, join(root, 'alias'));
    let inside = 0;
    let most = 0;
    const hold = (path: string) => withBankLock(path, async () => {
      most = Math.max(most, ++inside);
      await new Promise((resolve) => setTimeout(resolve, 30));
      inside--;
    });
    await Promise.all([hold(dir), hold(join(root, 'alias')), hold(dir), hold(join(root, 'alias'))]);
    expect(most).toBe(1);
    // a lock of this process's pid whose token is not live is a leftover: taken over
    await writeFile(join(dir, '.lock'), `${process.pid} 0000000000000000\n`);
    expect(await withBankLock(dir, async () => 'ran')).toBe('ran');
  });

  it("lets exactly one of several racing processes hold the lock at a time, from a dead writer's lock on", async () => {
    const dir = join(root, 'race');
    await mkdir(dir, { recursive: true });
    // Node 20 cannot run TypeScript: compile the lock's import closure (no type check) for the children
    const compiled = join(root, 'js');
    const tsc = resolve('node_modules/typescript/bin/tsc');
    await promisify(execFile)(process.execPath, [tsc, '--outDir', compiled, '--rootDir', '.', '--module', 'NodeNext', '--moduleResolution', 'NodeNext',
      '--target', 'ES2022', '--skipLibCheck', '--noCheck', '--types', 'node', 'src/compress/bank-lock.ts']);
    await writeFile(join(compiled, 'package.json'), '{"type":"module"}\n');
    const child = join(compiled, 'child.js');
    // each child takes the lock `rounds` times, retrying on BANK_CONFLICT, and logs enter/exit with a pause inside
    await writeFile(child, `
import { appendFileSync } from 'node:fs';
import { withBankLock } from './src/compress/bank-lock.js';
const [dir, log, name, roundsText, startAt] = process.argv.slice(2);
while (Date.now() < Number(startAt)) {}
for (let round = 0; round < Number(roundsText); ) {
  try {
    await withBankLock(dir, async () => {
      appendFileSync(log, 'enter ' + name + '\\n');
      await new Promise((done) => setTimeout(done, 3));
      appendFileSync(log, 'exit ' + name + '\\n');
    });
    round++;
  } catch (e) {
    if (e.code !== 'BANK_CONFLICT') throw e;
    await new Promise((done) => setTimeout(done, Math.random() * 3));
  }
}
`);
    const log = join(root, 'race.log');
    await writeFile(log, '');
    await writeFile(join(dir, '.lock'), `${await deadPid()}\n`);
    const startAt = Date.now() + 500; // every child spins until then, so they reach the dead lock together
    const children = ['a', 'b', 'c', 'd'].map((name) =>
      promisify(execFile)(process.execPath, [child, dir, log, name, '6', String(startAt)]),
    );
    await Promise.all(children);
    const lines = (await readFile(log, 'utf8')).trim().split('\n');
    expect(lines).toHaveLength(4 * 6 * 2);
    expectSerial(lines);
    expect(await readdir(dir)).toEqual([]);
  }, 60_000);
});

describe('adding to one bank at once', () => {
  it('lands both adapters when two are added concurrently in one process', async () => {
    const slots = [{ path: 'model.layers.0.self_attn.q_proj', inFeatures: 24, outFeatures: 16 }];
    const inputs = syntheticAdapterSet({ slots, count: 5, rank: 4, sharedRank: 3, noise: 0.05, seed: 11 });
    const result = await compressAdapters(inputs.slice(0, 3), { method: 'jd-full', maxError: 0.2, seed: 3 });
    const extras = new Map<string, AdapterExtras>(inputs.map(({ id, adapter }) => [id, { passthrough: adapter.passthrough, config: null }]));
    const dir = join(root, 'bank');
    await writeBank(dir, result, extras);
    await Promise.all([addToBank(dir, 'first', inputs[3]!.adapter, { maxError: 0.5 }), addToBank(dir, 'second', inputs[4]!.adapter, { maxError: 0.5 })]);
    const manifest = parseManifest(await readFile(join(dir, 'manifest.json'), 'utf8'), join(dir, 'manifest.json'));
    expect(manifest.adapters.map((a) => a.id).sort()).toEqual([...inputs.slice(0, 3).map((i) => i.id), 'first', 'second'].sort());
  });
});
