import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { watchBank } from '../../src/cli/watch-bank.js';

const dirs: string[] = [];
afterAll(async () => {
  for (const dir of dirs) await rm(dir, { recursive: true, force: true });
});

/** Replaces the manifest as the bank writers do: a temporary file renamed over it. */
async function writeManifest(dir: string, generation: number): Promise<void> {
  await writeFile(join(dir, 'manifest.tmp'), JSON.stringify({ generation }));
  await rename(join(dir, 'manifest.tmp'), join(dir, 'manifest.json'));
}

/** A fresh bank folder holding a first manifest. */
async function bankFolder(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'soppu-watch-bank-'));
  dirs.push(dir);
  await writeManifest(dir, 1);
  return dir;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

const until = async (done: () => boolean, ms = 3000): Promise<void> => {
  const start = Date.now();
  while (!done() && Date.now() - start < ms) await sleep(10);
};

describe('watchBank (serve --bank-watch-s)', () => {
  it('reloads once per change of manifest.json, one reload at a time, and stops when told', async () => {
    const dir = await bankFolder();
    const lines: string[] = [];
    let reloads = 0;
    let release: (() => void) | null = null;
    const stop = watchBank(dir, 20, async () => {
      reloads++;
      if (reloads === 2) await new Promise<void>((resolve) => { release = resolve; });
      return { adapters: reloads };
    }, (line) => lines.push(line));
    await sleep(150);
    expect(reloads).toBe(0); // nothing changed yet
    await writeManifest(dir, 2);
    await until(() => lines.length === 1);
    expect(lines).toEqual(['bank changed on disk: reloaded, 1 adapter']);
    // a change while a reload runs is reloaded after it, not beside it
    await writeManifest(dir, 3);
    await until(() => release !== null);
    await writeManifest(dir, 4);
    await sleep(150);
    expect(reloads).toBe(2);
    release!();
    await until(() => reloads === 3 && lines.length === 3);
    expect(lines.slice(1)).toEqual(['bank changed on disk: reloaded, 2 adapters', 'bank changed on disk: reloaded, 3 adapters']);
    stop();
    await writeManifest(dir, 5);
    await sleep(150);
    expect(reloads).toBe(3);
  });

  it('a failed reload is a log line, and the next change is reloaded again', async () => {
    const dir = await bankFolder();
    const lines: string[] = [];
    let calls = 0;
    const stop = watchBank(dir, 20, async () => {
      calls++;
      if (calls === 1) throw new Error('manifest.json: generation is not an integer');
      return { adapters: 7 };
    }, (line) => lines.push(line));
    await writeManifest(dir, 2);
    await until(() => lines.length === 1);
    await writeManifest(dir, 3);
    await until(() => lines.length === 2);
    stop();
    expect(lines).toEqual([
      'bank changed on disk, but the reload failed; the bank read before stays: manifest.json: generation is not an integer',
      'bank changed on disk: reloaded, 7 adapters',
    ]);
  });
});
