import { SoppuError } from '../errors/soppu-error.js';

/**
 * An integer flag's value: decimal digits (a leading minus where `min` is negative) within [min, max],
 * else a CONFIG error naming the flag, the range and the value. Number() alone also takes '1e3', '0x10'
 * and '' (as 0), and rounds integers past 2^53 (a seed past it became another seed).
 */
export function parseInteger(value: string, flag: string, min: number, max?: number): number;
export function parseInteger(value: string | undefined, flag: string, min: number, max?: number): number | undefined;
export function parseInteger(value: string | undefined, flag: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (value === undefined) return undefined;
  const n = /^\s*-?\d+\s*$/.test(value) ? Number(value) : Number.NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new SoppuError('CONFIG', `--${flag} must be an integer from ${min} to ${max}, got "${value}"`, { field: flag, limit: `[${min}, ${max}]` });
  }
  return n;
}
