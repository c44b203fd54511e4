/** soppu_tokens_per_second's rate: over a trailing window, the same for every reader. */
import { describe, expect, it } from 'vitest';
import { TrailingRate } from '../../src/server/trailing-rate.js';

describe('TrailingRate', () => {
  it('reads the same value however often it is read (a read does not reset it)', () => {
    let now = 0;
    let tokens = 0;
    const rate = new TrailingRate(() => tokens, 10_000, 0, () => now);
    for (let second = 1; second <= 5; second++) {
      now = second * 1000;
      tokens += 50;
      rate.sample();
    }
    expect(rate.perSecond()).toBe(50);
    expect(rate.perSecond()).toBe(50); // a second scraper right after the first
  });

  it('covers the trailing window: older traffic drops out of it', () => {
    let now = 0;
    let tokens = 0;
    const rate = new TrailingRate(() => tokens, 10_000, 0, () => now);
    for (let second = 1; second <= 30; second++) {
      now = second * 1000;
      tokens += second <= 10 ? 100 : 0; // a burst in the first 10 s, then idle
      rate.sample();
    }
    expect(rate.perSecond()).toBe(0);
    now = 31_000;
    tokens += 200; // 200 tokens in the last second of the 10 s window
    expect(rate.perSecond()).toBe(20);
  });

  it('is 0 before any time has passed, and the averaging starts at the first sample', () => {
    let now = 5_000;
    let tokens = 7;
    const rate = new TrailingRate(() => tokens, 10_000, 0, () => now);
    expect(rate.perSecond()).toBe(0);
    now = 7_000;
    tokens = 27;
    expect(rate.perSecond()).toBe(10);
  });

  it('samples on its own timer and stops when closed', async () => {
    let reads = 0;
    const rate = new TrailingRate(() => ++reads, 10_000, 5);
    await new Promise((resolve) => setTimeout(resolve, 60));
    rate.close();
    const afterClose = reads;
    expect(afterClose).toBeGreaterThan(3);
    await new Promise((resolve) => setTimeout(resolve, 30));
    expect(reads).toBe(afterClose);
  });
});
