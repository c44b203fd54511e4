import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isSoppuError, type ErrorCode } from '../../src/errors/soppu-error.js';
import { openSafetensors, safetensorsToBytes, writeSafetensors } from '../../src/io/safetensors.js';
import type { TensorToWrite } from '../../src/io/safetensors-types.js';
import { f32ToBf16, f32ToF16 } from '../../src/tensor/dtype.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'soppu-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A raw file from a header object and a data section. */
function rawFile(header: unknown, data: Uint8Array = new Uint8Array(0), headerText?: string): Uint8Array {
  const json = new TextEncoder().encode(headerText ?? JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

let counter = 0;
async function fileOf(bytes: Uint8Array): Promise<string> {
  const path = join(dir, `case-${counter++}.safetensors`);
  await writeFile(path, bytes);
  return path;
}

async function expectError(bytes: Uint8Array, code: ErrorCode, pattern: RegExp, limits = {}): Promise<void> {
  const path = await fileOf(bytes);
  const error = await openSafetensors(path, limits).then(
    async (f) => {
      await f.close();
      return null;
    },
    (e: unknown) => e,
  );
  expect(isSoppuError(error, code), `expected ${code}, got ${String(error)}`).toBe(true);
  expect((error as Error).message).toMatch(pattern);
  expect((error as Error).message).toContain(path);
}

const sample: TensorToWrite[] = [
  { name: 'b.f16', dtype: 'F16', shape: [3], data: Uint16Array.from([1, -2, 0.5].map(f32ToF16)) },
  { name: 'a.f32', dtype: 'F32', shape: [2, 2], data: Float32Array.from([1, 2, 3, 4]) },
  { name: 'c.bf16', dtype: 'BF16', shape: [2], data: Uint16Array.from([3, -0.25].map(f32ToBf16)) },
  { name: 'd.f64', dtype: 'F64', shape: [1], data: Float64Array.from([Math.PI]) },
  { name: 'e.i64', dtype: 'I64', shape: [2], data: BigInt64Array.from([-1n, 2n ** 40n]) },
  { name: 'f.i32', dtype: 'I32', shape: [1], data: Int32Array.from([-7]) },
  { name: 'g.i16', dtype: 'I16', shape: [1], data: Int16Array.from([-3]) },
  { name: 'h.i8', dtype: 'I8', shape: [2], data: Int8Array.from([-1, 1]) },
  { name: 'i.u8', dtype: 'U8', shape: [1], data: Uint8Array.from([255]) },
  { name: 'j.bool', dtype: 'BOOL', shape: [2], data: Uint8Array.from([1, 0]) },
  { name: 'k.empty', dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
  { name: 'l.scalar', dtype: 'F32', shape: [], data: Float32Array.from([9]) },
];

describe('safetensors write/read', () => {
  it('round-trips every dtype, sorts by name, aligns the data section', async () => {
    const path = join(dir, 'all.safetensors');
    await writeSafetensors(path, sample, { format: 'pt', z: 'last' });
    const bytes = await readFile(path);
    const headerLength = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
    expect((8 + headerLength) % 8).toBe(0);
    const headerText = bytes.subarray(8, 8 + headerLength).toString('utf8');
    expect(headerText.startsWith('{"__metadata__":{"format":"pt","z":"last"},"a.f32":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}')).toBe(true);
    const file = await openSafetensors(path);
    try {
      expect(file.metadata).toEqual({ format: 'pt', z: 'last' });
      expect(file.tensors.map((t) => t.name)).toEqual([...sample.map((t) => t.name)].sort());
      for (const t of sample) {
        const data = await file.read(t.name);
        expect(data.constructor).toBe(t.data.constructor);
        expect(Array.from(data as ArrayLike<number | bigint>)).toEqual(Array.from(t.data as ArrayLike<number | bigint>));
        expect(file.get(t.name)?.shape).toEqual(t.shape);
      }
      expect(Array.from(await file.readF32('b.f16'))).toEqual([1, -2, 0.5]);
      expect(Array.from(await file.readF32('c.bf16'))).toEqual([3, -0.25]);
      expect((await file.readF32('d.f64'))[0]).toBeCloseTo(Math.PI, 6);
      await expect(file.readF32('f.i32')).rejects.toMatchObject({ code: 'SAFETENSORS_DTYPE' });
      await expect(file.read('nope')).rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR' });
    } finally {
      await file.close();
    }
    await expect(file.read('a.f32')).rejects.toMatchObject({ code: 'FILE_IO' });
    // No temp files left behind.
    expect((await readdir(dir)).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });

  it('writes byte-identical files regardless of input order', async () => {
    const one = safetensorsToBytes(sample, { b: '2', a: '1' });
    const two = safetensorsToBytes([...sample].reverse(), { a: '1', b: '2' });
    expect(Buffer.from(one).equals(Buffer.from(two))).toBe(true);
  });

  it('refuses bad tensors on write', async () => {
    await expect(writeSafetensors(join(dir, 'x.safetensors'), [{ name: 'a', dtype: 'F16', shape: [1], data: new Float32Array(1) }])).rejects.toMatchObject({ code: 'SAFETENSORS_DTYPE' });
    await expect(writeSafetensors(join(dir, 'x.safetensors'), [{ name: 'a', dtype: 'F32', shape: [3], data: new Float32Array(2) }])).rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR' });
    const dup = { name: 'a', dtype: 'F32', shape: [1], data: new Float32Array(1) } as const;
    await expect(writeSafetensors(join(dir, 'x.safetensors'), [dup, dup])).rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR' });
    await expect(writeSafetensors(join(dir, 'missing-dir', 'x.safetensors'), [dup])).rejects.toMatchObject({ code: 'FILE_IO' });
    // A failed rename (the target is a non-empty directory) leaves no temp file and the target intact.
    const blocked = join(dir, 'blocked');
    await (await import('node:fs/promises')).mkdir(join(blocked, 'inside'), { recursive: true });
    await expect(writeSafetensors(blocked, [dup])).rejects.toMatchObject({ code: 'FILE_IO' });
    expect((await readdir(dir)).filter((n) => n.includes('.tmp-'))).toEqual([]);
    expect(await readdir(blocked)).toEqual(['inside']);
  });

  it('reads a file written by hand to the spec (unpadded header)', async () => {
    const data = new Uint8Array(new Float32Array([1.5, -2]).buffer);
    const path = await fileOf(rawFile({ w: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, data));
    const file = await openSafetensors(path);
    expect(Array.from(await file.readF32('w'))).toEqual([1.5, -2]);
    expect(file.metadata).toEqual({});
    await file.close();
  });

  it('reads lazily: tensors are read one at a time, a file truncated after open fails cleanly', async () => {
    const path = join(dir, 'lazy.safetensors');
    await writeSafetensors(path, [
      { name: 'first', dtype: 'F32', shape: [4], data: Float32Array.from([1, 2, 3, 4]) },
      { name: 'second', dtype: 'F32', shape: [1000], data: new Float32Array(1000).fill(7) },
    ]);
    const file = await openSafetensors(path);
    const { truncate } = await import('node:fs/promises');
    await truncate(path, (await readFile(path)).length - 100);
    expect(Array.from((await file.read("first")) as Float32Array)).toEqual([1, 2, 3, 4]);
    await expect(file.read('second')).rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR', message: expect.stringMatching(/tensor "second": file ended after \d+ bytes/) });
    await file.close();
  });

  it('readInto fills a caller\'s memory with exactly the tensor\'s bytes, and refuses a target of another length', async () => {
    const path = join(dir, 'into.safetensors');
    await writeSafetensors(path, [{ name: 'w', dtype: 'BF16', shape: [3], data: Uint16Array.from([1, 2, 0xffff]) }]);
    const file = await openSafetensors(path);
    const arena = new ArrayBuffer(16);
    await file.readInto('w', new Uint8Array(arena, 8, 6));
    expect(Array.from(new Uint16Array(arena, 8, 3))).toEqual([1, 2, 0xffff]);
    expect(Array.from(new Uint8Array(arena, 0, 8)).every((b) => b === 0)).toBe(true);
    await expect(file.readInto('w', new Uint8Array(5))).rejects.toMatchObject({ code: 'INTERNAL', message: expect.stringMatching(/tensor "w" has 6 bytes, its target 5/) });
    await expect(file.readInto('nope', new Uint8Array(6))).rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR' });
    await file.close();
    await expect(file.readInto('w', new Uint8Array(6))).rejects.toMatchObject({ code: 'FILE_IO', message: expect.stringMatching(/after close/) });
  });

  it('reports missing files as FILE_NOT_FOUND', async () => {
    await expect(openSafetensors(join(dir, 'absent.safetensors'))).rejects.toMatchObject({ code: 'FILE_NOT_FOUND' });
  });
});

describe('safetensors hostile headers', () => {
  const f32x2 = new Uint8Array(8);
  const entry = (o: Record<string, unknown> = {}) => ({ dtype: 'F32', shape: [2], data_offsets: [0, 8], ...o });

  it('refuses a short file and a header length past the limit or the file', async () => {
    await expectError(new Uint8Array(5), 'SAFETENSORS_HEADER', /shorter than the 8-byte/);
    const huge = new Uint8Array(16);
    new DataView(huge.buffer).setBigUint64(0, 2n ** 63n, true);
    await expectError(huge, 'SAFETENSORS_HEADER', /exceeds the limit of 104857600/);
    const past = rawFile({});
    new DataView(past.buffer).setBigUint64(0, 100n, true);
    await expectError(past, 'SAFETENSORS_HEADER', /runs past the end/);
    await expectError(rawFile({ w: entry() }, f32x2), 'SAFETENSORS_HEADER', /limit of 10 bytes/, { maxHeaderBytes: 10 });
  });

  it('refuses invalid JSON, UTF-8 and non-object headers', async () => {
    await expectError(rawFile(null, undefined, '{"a": '), 'SAFETENSORS_HEADER', /not valid JSON/);
    await expectError(rawFile(null, undefined, '[1, 2]'), 'SAFETENSORS_HEADER', /must be a JSON object, got an array/);
    await expectError(rawFile(null, undefined, 'null'), 'SAFETENSORS_HEADER', /got null/);
    const badUtf8 = rawFile(null, undefined, '{"\u00e9":1}');
    badUtf8[10] = 0xff;
    await expectError(badUtf8, 'SAFETENSORS_HEADER', /not valid UTF-8/);
  });

  it('refuses duplicate names, including in entries', async () => {
    const text = `{"w":${JSON.stringify(entry())},"w":${JSON.stringify(entry())}}`;
    await expectError(rawFile(null, f32x2, text), 'SAFETENSORS_HEADER', /key "w" more than once/);
    const inner = '{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    await expectError(rawFile(null, f32x2, inner), 'SAFETENSORS_HEADER', /key "dtype" more than once/);
  });

  it('refuses malformed metadata', async () => {
    await expectError(rawFile({ __metadata__: [], w: entry() }, f32x2), 'SAFETENSORS_HEADER', /__metadata__ must be an object/);
    await expectError(rawFile({ __metadata__: { a: 1 }, w: entry() }, f32x2), 'SAFETENSORS_HEADER', /value for "a" must be a string/);
  });

  it('refuses bad entries naming the tensor', async () => {
    await expectError(rawFile({ w: 3 }, f32x2), 'SAFETENSORS_TENSOR', /"w": entry must be an object/);
    await expectError(rawFile({ w: entry({ extra: 1 }) }, f32x2), 'SAFETENSORS_TENSOR', /"w": unknown field "extra"/);
    await expectError(rawFile({ w: entry({ dtype: 'F8_E4M3' }) }, f32x2), 'SAFETENSORS_DTYPE', /"w": dtype "F8_E4M3" is not supported/);
    await expectError(rawFile({ w: entry({ dtype: 7 }) }, f32x2), 'SAFETENSORS_TENSOR', /dtype must be a string/);
    await expectError(rawFile({ w: entry({ shape: [-1] }) }, f32x2), 'SAFETENSORS_TENSOR', /shape entry -1/);
    await expectError(rawFile({ w: entry({ shape: [1.5] }) }, f32x2), 'SAFETENSORS_TENSOR', /shape entry 1.5/);
    await expectError(rawFile({ w: entry({ shape: [2 ** 53] }) }, f32x2), 'SAFETENSORS_TENSOR', /not a non-negative safe integer/);
    await expectError(rawFile({ w: entry({ shape: [1, 1, 1, 1, 1, 1, 1, 1, 2] }) }, f32x2), 'SAFETENSORS_TENSOR', /9 dimensions \(limit 8\)/);
    await expectError(rawFile({ w: entry({ shape: [2 ** 30, 2 ** 30] }) }, f32x2), 'SAFETENSORS_TENSOR', /exceeds 1099511627776 elements/);
    await expectError(rawFile({ w: entry({ shape: [3] }) }, f32x2), 'SAFETENSORS_TENSOR', /holds 8 bytes but F32 \[3\] needs 12/);
    await expectError(rawFile({ w: entry({ data_offsets: [0] }) }, f32x2), 'SAFETENSORS_TENSOR', /data_offsets must be/);
    await expectError(rawFile({ w: entry({ data_offsets: [8, 0] }) }, f32x2), 'SAFETENSORS_TENSOR', /end before they begin/);
    await expectError(rawFile({ w: entry({ data_offsets: [0, 16], shape: [4] }) }, f32x2), 'SAFETENSORS_TENSOR', /run past the data section of 8 bytes/);
  });

  it('describes a bad shape entry by its type, never by stringifying it (deep nesting overflowed the stack)', async () => {
    const deep = (depth: number) => `${'['.repeat(depth)}${']'.repeat(depth)}`;
    const text = (shape: string) => `{"w":{"dtype":"F32","shape":${shape},"data_offsets":[0,8]}}`;
    for (const depth of [1000, 5000, 50_000]) {
      await expectError(rawFile(null, f32x2, text(`[1,${deep(depth)}]`)), 'SAFETENSORS_TENSOR', /^[^[]*"w": shape entry an array of 1 is not a non-negative safe integer$/);
    }
    // the element limit is hit before the nested entry, whose shape the message would have joined
    await expectError(rawFile(null, f32x2, text(`[1073741824,1073741824,${deep(5000)}]`)), 'SAFETENSORS_TENSOR', /shape entry an array of 1 is not/);
    await expectError(rawFile({ w: entry({ shape: [{ a: 1 }] }) }, f32x2), 'SAFETENSORS_TENSOR', /shape entry an object is not/);
    await expectError(rawFile({ w: entry({ shape: ['x'.repeat(5000)] }) }, f32x2), 'SAFETENSORS_TENSOR', /shape entry "x{80}…" is not/);
    let nested: unknown = [];
    for (let i = 0; i < 50_000; i++) nested = [nested];
    await expect(writeSafetensors(join(dir, 'x.safetensors'), [{ name: 'a', dtype: 'F32', shape: [1, nested as number], data: new Float32Array(1) }]))
      .rejects.toMatchObject({ code: 'SAFETENSORS_TENSOR', message: expect.stringMatching(/shape entry an array of 1 is not/) });
  });

  it('bounds what JSON.parse builds: more containers or values than the tensor limits allow is refused before parsing', async () => {
    // the shapes of two hostile headers (a deeply nested __metadata__, a flat run of empty objects), scaled to
    // maxTensors 10: at the default limits their 90 MiB versions took the heap (an abort) or 3 GB and 30 s
    const limits = { maxTensors: 10 };
    const nested = `{"__metadata__":${'['.repeat(2000)}${']'.repeat(2000)}}`;
    await expectError(rawFile(null, new Uint8Array(0), nested), 'SAFETENSORS_HEADER', /holds more than 1054 JSON objects and arrays \(what 10 tensors can have\)/, limits);
    const flat = `{"__metadata__":{}${',"x":{}'.repeat(2000)}}`;
    await expectError(rawFile(null, new Uint8Array(0), flat), 'SAFETENSORS_HEADER', /holds more than 1054 JSON objects and arrays/, limits);
    const values = `{"__metadata__":[${'1,'.repeat(20_000)}1]}`;
    await expectError(rawFile(null, new Uint8Array(0), values), 'SAFETENSORS_HEADER', /holds more than 11154 JSON values \(what 10 tensors of rank 8 can have\)/, limits);
    // brackets and commas inside strings are text
    const inStrings = `{"__metadata__":{"note":"${'[{,'.repeat(5000)}\\"]"}}`;
    const file = await openSafetensors(await fileOf(rawFile(null, new Uint8Array(0), inStrings)), limits);
    expect(file.metadata['note']).toBe(`${'[{,'.repeat(5000)}"]`);
    await file.close();
  });

  it('refuses overlap, gaps and trailing bytes', async () => {
    const twoFloats = new Uint8Array(16);
    await expectError(rawFile({ a: entry(), b: entry({ data_offsets: [4, 12] }) }, twoFloats), 'SAFETENSORS_TENSOR', /"b": data_offsets \[4, 12\) overlap/);
    await expectError(rawFile({ a: entry(), b: entry({ shape: [1], data_offsets: [12, 16] }) }, twoFloats), 'SAFETENSORS_TENSOR', /"b": .*leave a gap after byte 8/);
    await expectError(rawFile({ a: entry() }, twoFloats), 'SAFETENSORS_HEADER', /cover 8 bytes but the data section holds 16/);
    await expectError(rawFile({ a: entry({ data_offsets: [8, 16] }) }, twoFloats), 'SAFETENSORS_TENSOR', /gap after byte 0/);
  });

  it('refuses bad names', async () => {
    await expectError(rawFile({ '': entry() }, f32x2), 'SAFETENSORS_HEADER', /name is empty/);
    await expectError(rawFile({ 'a\u0001': entry() }, f32x2), 'SAFETENSORS_HEADER', /control characters/);
    await expectError(rawFile({ ['x'.repeat(1025)]: entry() }, f32x2), 'SAFETENSORS_HEADER', /1025 characters \(limit 1024\)/);
    await expectError(rawFile({ a: entry() }, f32x2), 'SAFETENSORS_HEADER', /2 tensors|1 tensors \(limit 0\)/, { maxTensors: 0 });
  });
});
