import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { openSafetensors, safetensorsToBytes } from '../../src/io/safetensors.js';
import { ST_DTYPE_BYTES } from '../../src/tensor/dtype.js';
import { Random } from '../../src/tensor/random.js';

const ALLOWED = new Set(['SAFETENSORS_HEADER', 'SAFETENSORS_TENSOR', 'SAFETENSORS_DTYPE']);

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soppu-st-fuzz-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function validFiles(): Uint8Array[] {
  const random = new Random(7);
  const normals = (n: number) => random.fillNormal(new Float32Array(n));
  return [
    safetensorsToBytes([
      { name: 'model.layers.0.q_proj.weight', dtype: 'F32', shape: [4, 3], data: normals(12) },
      { name: 'bias', dtype: 'F32', shape: [3], data: normals(3) },
    ], { format: 'pt' }),
    safetensorsToBytes([
      { name: 'h', dtype: 'F16', shape: [5], data: Uint16Array.from({ length: 5 }, (_, i) => 0x3c00 + i) },
      { name: 'b', dtype: 'BF16', shape: [2, 2], data: Uint16Array.from([0x3f80, 0x4000, 0xbf80, 0]) },
      { name: 'i', dtype: 'I64', shape: [2], data: BigInt64Array.from([1n, -1n]) },
    ]),
    safetensorsToBytes([
      { name: 'u', dtype: 'U8', shape: [7], data: Uint8Array.from([1, 2, 3, 4, 5, 6, 7]) },
      { name: 'd', dtype: 'F64', shape: [1, 2], data: Float64Array.from([1, 2]) },
      { name: 'e', dtype: 'F32', shape: [0], data: new Float32Array(0) },
    ], { a: 'b' }),
  ];
}

/** Opens the bytes and reads every tensor; returns 'ok' or the error code. Anything else fails the test. */
async function exercise(path: string): Promise<string> {
  try {
    const file = await openSafetensors(path);
    try {
      for (const info of file.tensors) {
        const data = await file.read(info.name);
        const elements = info.shape.reduce((a, b) => a * b, 1);
        expect(data.length).toBe(elements);
        expect(data.byteLength).toBe(elements * ST_DTYPE_BYTES[info.dtype]);
        if (['F32', 'F16', 'BF16', 'F64'].includes(info.dtype)) expect((await file.readF32(info.name)).length).toBe(elements);
      }
    } finally {
      await file.close();
    }
    return 'ok';
  } catch (e) {
    if (isSoppuError(e) && ALLOWED.has(e.code)) {
      expect(e.message).toContain(path);
      return e.code;
    }
    throw e;
  }
}

describe('safetensors fuzz', () => {
  it('flipped bytes, truncations and splices fail only with SoppuErrors (or read correctly)', async () => {
    const random = new Random(20261128);
    const files = validFiles();
    const outcomes = new Map<string, number>();
    for (let c = 0; c < 360; c++) {
      const source = files[random.int(files.length)]!;
      let bytes: Uint8Array;
      const kind = c % 3;
      if (kind === 0) {
        bytes = source.slice();
        const flips = 1 + random.int(4);
        // Half the flips land in the header, where they matter most.
        for (let f = 0; f < flips; f++) {
          const at = random.next() < 0.7 ? random.int(Math.min(bytes.length, 200)) : random.int(bytes.length);
          bytes[at] = random.next() < 0.5 ? bytes[at]! ^ (1 << random.int(8)) : random.int(256);
        }
      } else if (kind === 1) {
        bytes = source.slice(0, random.int(source.length));
      } else {
        const other = files[random.int(files.length)]!;
        const start = random.int(other.length);
        const length = random.int(Math.min(64, other.length - start) + 1);
        const at = random.int(source.length + 1);
        const removed = random.int(Math.min(16, source.length - at) + 1);
        bytes = new Uint8Array(source.length - removed + length);
        bytes.set(source.subarray(0, at), 0);
        bytes.set(other.subarray(start, start + length), at);
        bytes.set(source.subarray(at + removed), at + length);
      }
      const path = join(dir, `fuzz-${c}.safetensors`);
      await writeFile(path, bytes);
      const outcome = await exercise(path);
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
    }
    // The corpus exercised both refusals and (harmless) accepted mutations.
    expect(outcomes.get('SAFETENSORS_HEADER') ?? 0).toBeGreaterThan(0);
    expect(outcomes.get('ok') ?? 0).toBeGreaterThan(0);
    for (const source of files) {
      const path = join(dir, 'pristine.safetensors');
      await writeFile(path, source);
      expect(await exercise(path)).toBe('ok');
    }
  });
});
