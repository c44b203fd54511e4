import { describe, expect, it } from 'vitest';
import { alignedBytes, alignedViews } from '../../src/tensor/aligned-views.js';
import { WEIGHT_DTYPE_BYTES, type WeightDtype } from '../../src/tensor/dtype.js';

describe('alignedViews', () => {
  it('hands out views in call order, each at the next 64-byte boundary, sized by alignedBytes', () => {
    expect([0, 1, 64, 65, 130].map(alignedBytes)).toEqual([0, 64, 64, 128, 192]);
    const sizes: [WeightDtype, number][] = [['bf16', 3], ['f32', 17], ['f16', 32]];
    const buffer = new ArrayBuffer(sizes.reduce((sum, [dtype, n]) => sum + alignedBytes(n * WEIGHT_DTYPE_BYTES[dtype]), 0));
    const take = alignedViews(buffer);
    const views = sizes.map(([dtype, n]) => take(dtype, n));
    expect(views.map((v) => v.constructor.name)).toEqual(['Uint16Array', 'Float32Array', 'Uint16Array']);
    expect(views.map((v) => v.byteOffset)).toEqual([0, 64, 192]);
    expect(views.map((v) => v.length)).toEqual([3, 17, 32]);
    expect(views.every((v) => v.buffer === buffer)).toBe(true);
    expect(() => take('f32', 1)).toThrow(RangeError);
  });
});
