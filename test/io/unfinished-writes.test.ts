/** An interrupted command removes the temp files of the writes it had in progress (removeUnfinishedWrites). */
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeUnfinishedWrites, writeFileAtomic } from '../../src/io/safetensors.js';

let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'soppu-unfinished-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('removeUnfinishedWrites', () => {
  it('deletes the temp file of a write in progress, and nothing of a finished one', async () => {
    await writeFileAtomic(join(root, 'done.bin'), [new Uint8Array(10)]);
    const chunks = Array.from({ length: 512 }, () => new Uint8Array(1 << 16));
    const writing = writeFileAtomic(join(root, 'big.bin'), chunks).catch((e: unknown) => e);
    let names: string[] = [];
    for (let i = 0; i < 1000 && !names.some((n) => n.includes('.tmp-')); i++) {
      await new Promise((resolve) => setImmediate(resolve));
      names = await readdir(root);
    }
    expect(names.some((n) => n.startsWith('.big.bin.tmp-'))).toBe(true);
    removeUnfinishedWrites();
    expect((await readdir(root)).filter((n) => n.includes('.tmp-'))).toEqual([]);
    expect(await writing).toBeInstanceOf(Error); // its rename finds no temp file: the write fails, nothing half-written stays
    expect((await readdir(root)).sort()).toEqual(['done.bin']);
  });
});
