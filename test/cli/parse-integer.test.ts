import { describe, expect, it } from 'vitest';
import { parseInteger } from '../../src/cli/parse-integer.js';

describe('parseInteger (every integer CLI flag)', () => {
  it('takes decimal digits within the range, a minus sign where the range allows it, and passes undefined through', () => {
    expect(parseInteger('42', 'rank', 1)).toBe(42);
    expect(parseInteger(' 7 ', 'rank', 1)).toBe(7);
    expect(parseInteger('-3', 'offset', -5, 5)).toBe(-3);
    expect(parseInteger(undefined, 'rank', 1)).toBeUndefined();
  });

  it('refuses what Number() would take or round, and values out of range, naming the flag, the range and the value', () => {
    for (const value of ['', ' ', '1e3', '0x10', '1.5', '+3', '9007199254740993', 'abc']) {
      expect(() => parseInteger(value, 'seed', 0), value).toThrow(`--seed must be an integer from 0 to 9007199254740991, got "${value}"`);
    }
    expect(() => parseInteger('0', 'rank', 1)).toThrow(expect.objectContaining({ code: 'CONFIG', context: expect.objectContaining({ field: 'rank', limit: '[1, 9007199254740991]' }) }));
    expect(() => parseInteger('513', 'tokens', 1, 512)).toThrow('--tokens must be an integer from 1 to 512, got "513"');
    expect(() => parseInteger('-1', 'seed', 0)).toThrow('--seed must be an integer from 0');
  });
});
