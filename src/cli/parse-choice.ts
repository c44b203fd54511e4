import { SoppuError } from '../errors/soppu-error.js';

/** A flag's value when it is one of `allowed`, else a CONFIG error naming the flag, the choices and the value. */
export function parseChoice<T extends string>(value: string, allowed: readonly T[], flag: string): T {
  if (!(allowed as readonly string[]).includes(value)) {
    throw new SoppuError('CONFIG', `--${flag} must be one of ${allowed.join(', ')} (got "${value}")`, { field: flag, limit: allowed.join(', ') });
  }
  return value as T;
}
