/**
 * keys.json validation: typos and unusable keys are CONFIG errors that name the file and the entry
 * (by position) but never print the key; setups that load but lock everyone out carry a warning.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { AccessControl } from '../../src/server/access-control.js';

const root = mkdtempSync(path.join(tmpdir(), 'soppu-keys-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** The CONFIG error `fromJson` throws; asserts that no key of `value` appears in it. */
function configError(value: Record<string, unknown>, file = 'keys.json'): string {
  let thrown: unknown;
  try {
    AccessControl.fromJson(value, file);
  } catch (e) {
    thrown = e;
  }
  expect(isSoppuError(thrown, 'CONFIG'), String(thrown)).toBe(true);
  const message = (thrown as Error).message;
  for (const key of Object.keys(value)) if (key.trim() !== '') expect(message).not.toContain(key.trim());
  expect(JSON.stringify((thrown as { context: unknown }).context)).not.toMatch(/sk-/);
  return message;
}

describe('keys.json entries', () => {
  it('an unknown field (the "adapter" typo) is refused, naming the file, the entry and the field', () => {
    const message = configError({
      'sk-admin-0123456789': { role: 'admin', adapters: [] },
      'sk-alice-0123456789': { role: 'user', adapter: ['alice-*'] },
    });
    expect(message).toBe('keys.json: entry #2: unknown field "adapter" (did you mean "adapters"?); an entry has only "role" and "adapters"');
    expect(configError({ 'sk-alice-0123456789': { role: 'user', adapters: [], comment: 'x', rol: 'y' } })).toMatch(
      /^keys\.json: entry #1: unknown fields "comment", "rol"; an entry has only "role" and "adapters"$/,
    );
  });

  it('a key with whitespace or a control character is refused (no Authorization header could carry it)', () => {
    for (const key of ['sk bob 0123456789', 'sk-bob-0123456789 ', ' sk-bob-0123456789', 'sk-bob\t0123456789', 'sk-bob-01234\n56789', 'sk-bob-012\u000045678', 'sk-bob-012\u007f45678', 'sk-bob\u00a00123456789']) {
      const message = configError({ 'sk-admin-0123456789': { role: 'admin' }, [key]: { role: 'user', adapters: ['bob-*'] } });
      expect(message, JSON.stringify(key)).toBe('keys.json: entry #2: API key contains whitespace or a control character, so no Authorization header can carry it');
    }
  });

  it('an empty or too-short key is refused as before', () => {
    expect(configError({ '': { role: 'admin' } })).toMatch(/^keys\.json: entry #1: API key must be at least 8 characters$/);
    expect(configError({ short: { role: 'admin' } })).toMatch(/entry #1: API key must be at least 8 characters/);
  });

  it('the existing checks stay: entry shape, role, adapters', () => {
    expect(configError({ 'sk-secret-0123': [] })).toMatch(/entry #1: expected \{role, adapters\}/);
    expect(configError({ 'sk-secret-0123': 'admin' })).toMatch(/entry #1: expected \{role, adapters\}/);
    expect(configError({ 'sk-secret-0123': { role: 'root' } })).toMatch(/entry #1: role must be "admin" or "user", got "root"/);
    expect(configError({ 'sk-secret-0123': { adapters: [] } })).toMatch(/entry #1: role must be "admin" or "user", got undefined/);
    expect(configError({ 'sk-secret-0123': { role: 'user', adapters: 'alice-*' } })).toMatch(/entry #1: adapters must be an array/);
    expect(configError({ 'sk-secret-0123': { role: 'user', adapters: [''] } })).toMatch(/entry #1: adapters must be an array/);
    expect(() => AccessControl.fromJson([], 'keys.json')).toThrow(/keys\.json: expected an object mapping API keys/);
  });

  it('a valid file loads and resolves its keys; adapters may be left out', () => {
    const access = AccessControl.fromJson(
      { 'sk-admin-0123456789': { role: 'admin' }, 'sk-alice-0123456789': { role: 'user', adapters: ['alice-*', 'shared-?'] } },
      'keys.json',
    );
    expect(access.size).toBe(2);
    expect(access.warnings).toEqual([]);
    const alice = access.resolve('Bearer sk-alice-0123456789');
    expect(alice).toMatchObject({ role: 'user', keyIndex: 1 });
    expect(alice!.mayUse('alice-7')).toBe(true);
    expect(alice!.mayUse('shared-1')).toBe(true);
    expect(alice!.mayUse('bob-1')).toBe(false);
    expect(access.resolve('Bearer sk-admin-0123456789')).toMatchObject({ role: 'admin', keyIndex: 0 });
    expect(access.resolve('Bearer sk-nobody-0123456789')).toBeNull();
  });
});

describe('keys.json that loads but locks callers out', () => {
  it('an empty object loads with a warning naming the file: every request would get 401', () => {
    const access = AccessControl.fromJson({}, 'keys.json');
    expect(access.size).toBe(0);
    expect(access.warnings).toEqual(['keys.json holds no keys: every request to an authenticated route will get 401']);
  });

  it('a file with user keys only warns that the admin routes are unreachable, without printing keys', () => {
    const access = AccessControl.fromJson({ 'sk-alice-0123456789': { role: 'user', adapters: ['alice-*'] } }, 'keys.json');
    expect(access.warnings).toEqual(['keys.json has no admin key: no caller can reach the adapter-management (admin) routes']);
    expect(access.warnings.join('\n')).not.toContain('sk-alice');
  });

  it('fromFile names the file in errors and warnings', () => {
    const typo = path.join(root, 'typo.json');
    writeFileSync(typo, JSON.stringify({ 'sk-alice-0123456789': { role: 'user', adapter: ['alice-*'] } }));
    expect(() => AccessControl.fromFile(typo)).toThrow(`${typo}: entry #1: unknown field "adapter"`);
    const empty = path.join(root, 'empty.json');
    writeFileSync(empty, '{}');
    expect(AccessControl.fromFile(empty).warnings).toEqual([`${empty} holds no keys: every request to an authenticated route will get 401`]);
  });
});
