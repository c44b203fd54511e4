/**
 * Memory for long-lived weights: the addon's huge-page buffer where it is built and the platform allows it,
 * else a plain ArrayBuffer.
 */
import { constants as bufferConstants } from 'node:buffer';
import { loadNativeAddon } from './native-addon.js';

/** The transparent huge page size on x86-64 Linux. */
export const HUGE_PAGE_BYTES = 2 << 20;

/** The largest buffer the addon maps (Node 20 makes no larger external ArrayBuffer); larger ones are plain. */
export const MAX_LARGE_PAGE_BUFFER_BYTES = Math.min(2 ** 32, bufferConstants.MAX_LENGTH);

/**
 * `bytes` zero bytes for long-lived weights. From 2 MiB to 4 GiB, with the addon on Linux: an anonymous
 * mapping aligned to 2 MiB and advised for transparent huge pages before anything touches it, so a step that
 * reads every weight walks a page table per 2 MiB instead of per 4 KiB (docs/architecture.md, "Huge pages").
 */
export function largePageBuffer(bytes: number): ArrayBuffer {
  const make = loadNativeAddon().addon?.largePageBuffer;
  // below one huge page there is nothing to gain, and a mapping per small buffer would only add up
  if (bytes >= HUGE_PAGE_BYTES && bytes <= MAX_LARGE_PAGE_BUFFER_BYTES && typeof make === 'function') {
    try {
      const buffer: unknown = make(bytes);
      if (buffer instanceof ArrayBuffer) return buffer;
    } catch {
      // the runtime refused an external buffer: a plain one serves the same
    }
  }
  return new ArrayBuffer(bytes);
}
