import { describe, expect, it } from 'vitest';
import { describeKernels, getKernels } from '../../src/kernels/index.js';

describe('soppu info', () => {
  it('reports a chosen variant that is one of the supported ones', () => {
    const description = describeKernels();
    expect(description.nativeError).toBeNull();
    const supported = description.variants.filter((v) => v.supported).map((v) => `native-${v.name}`);
    expect(supported).toContain(description.chosen);
    expect(getKernels().name).toBe(description.chosen);
    expect(description.threads).toBeGreaterThanOrEqual(1);
  });
});
