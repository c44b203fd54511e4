import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { largePageBuffer } from '../../src/kernels/large-page-buffer.js';
import { loadNativeAddon } from '../../src/kernels/native-addon.js';

const { addon } = loadNativeAddon();
const native = addon?.largePageBuffer as ((bytes: number) => ArrayBuffer | undefined) | undefined;
const HUGE_PAGE = 2 << 20;

/** /sys/kernel/mm/transparent_hugepage/enabled, or '' where the kernel has no THP. */
function thpMode(): string {
  try {
    return readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8');
  } catch {
    return '';
  }
}

/** The /proc/self/smaps entry of the mapping that starts at a 2 MiB boundary and spans exactly `bytes`. */
function mappingOf(bytes: number): { start: number; fields: string } | undefined {
  const entries = readFileSync('/proc/self/smaps', 'utf8').split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/);
  for (const entry of entries) {
    const match = /^([0-9a-f]+)-([0-9a-f]+) /.exec(entry);
    if (!match) continue;
    const start = Number.parseInt(match[1]!, 16);
    if (Number.parseInt(match[2]!, 16) - start === bytes && start % HUGE_PAGE === 0) return { start, fields: entry };
  }
  return undefined;
}

describe('largePageBuffer', () => {
  // first in the file: a mapping next to another advised one may merge with it into one smaps entry. Only where
  // the kernel has THP on: without it madvise fails and the mapping may merge with any anonymous neighbour.
  it.runIf(native !== undefined && /\[(always|madvise)\]/.test(thpMode()))('maps the buffer 2 MiB-aligned, advised for transparent huge pages', () => {
    const bytes = 3 * HUGE_PAGE + 8192; // a page multiple: the mapping spans exactly this
    const buffer = native!(bytes)!;
    new Uint8Array(buffer).fill(1);
    const mapping = mappingOf(bytes);
    expect(mapping, 'a 2 MiB-aligned mapping of the buffer size').toBeDefined();
    // kernels before 5.x have no THPeligible line
    if (/THPeligible:/.test(mapping!.fields)) expect(mapping!.fields).toMatch(/THPeligible:\s+1/);
  });

  it('gives a zeroed, writable ArrayBuffer of exactly the bytes asked for', () => {
    for (const bytes of [1, 4095, 4097, 3 * HUGE_PAGE + 12_345]) {
      const buffer = largePageBuffer(bytes);
      expect(buffer).toBeInstanceOf(ArrayBuffer);
      expect(buffer.byteLength).toBe(bytes);
      const view = new Uint8Array(buffer);
      expect(view.every((b) => b === 0)).toBe(true);
      view.fill(7);
      expect(view[bytes - 1]).toBe(7);
    }
    expect(largePageBuffer(0).byteLength).toBe(0);
    // past the 4 GiB an external buffer may hold on Node 20: a plain one (reserved, not touched here)
    const beyond = largePageBuffer(2 ** 32 + 4096);
    expect(beyond.byteLength).toBe(2 ** 32 + 4096);
    new Uint8Array(beyond, 2 ** 32, 4096)[4095] = 9;
  });

  it.runIf(native !== undefined)('refuses a size that is not a whole number of at least one byte', () => {
    for (const bad of [0, -1, 1.5, Number.NaN, 2 ** 32 + 1, 2 ** 60]) expect(() => native!(bad), String(bad)).toThrow(/largePageBuffer: bytes must be a whole number/);
    expect(() => (native as unknown as (v: unknown) => unknown)('8')).toThrow(/largePageBuffer: bytes must be a number/);
  });
});
