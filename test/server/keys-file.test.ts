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

  it('a key with a character outside printable ASCII is refused, naming it (a pasted "sk-admin-…" could never authenticate)', () => {
    for (const [key, shown] of [['sk-admin-\u2026', '"\u2026"'], ['sk-caf\u00e9-0123456789', '"\u00e9"']] as const) {
      expect(configError({ 'sk-admin-0123456789': { role: 'admin' }, [key]: { role: 'user', adapters: ['bob-*'] } }))
        .toBe(`keys.json: entry #2: API key has a character outside printable ASCII (${shown}), which an Authorization header cannot carry as written`);
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

describe('keys file reload', () => {
  it('reload swaps the keys in at once: an added key resolves, a removed one no longer does, changed adapters apply', () => {
    const file = path.join(root, 'reload.json');
    writeFileSync(file, JSON.stringify({ 'sk-admin-0123456789': { role: 'admin' }, 'sk-alice-0123456789': { role: 'user', adapters: ['alice-*'] } }));
    const access = AccessControl.fromFile(file);
    expect(access.file).toBe(file);
    expect(access.resolve('Bearer sk-carol-0123456789')).toBeNull();
    writeFileSync(file, JSON.stringify({ 'sk-admin-0123456789': { role: 'admin' }, 'sk-carol-0123456789': { role: 'user', adapters: ['carol-1'] } }));
    expect(access.reload()).toEqual({ keys: 2, warnings: [] });
    expect(access.size).toBe(2);
    expect(access.resolve('Bearer sk-alice-0123456789')).toBeNull();
    const carol = access.resolve('Bearer sk-carol-0123456789');
    expect(carol?.mayUse('carol-1')).toBe(true);
    expect(carol?.mayUse('carol-2')).toBe(false);
    // warnings follow the file read last
    writeFileSync(file, JSON.stringify({ 'sk-carol-0123456789': { role: 'user', adapters: ['carol-*'] } }));
    expect(access.reload()).toEqual({ keys: 1, warnings: [`${file} has no admin key: no caller can reach the adapter-management (admin) routes`] });
    expect(access.warnings).toEqual([`${file} has no admin key: no caller can reach the adapter-management (admin) routes`]);
  });

  it('a file that does not load changes nothing: the error names the file, the keys loaded before stay', () => {
    const file = path.join(root, 'reload-bad.json');
    writeFileSync(file, JSON.stringify({ 'sk-admin-0123456789': { role: 'admin' }, 'sk-alice-0123456789': { role: 'user', adapters: ['alice-*'] } }));
    const access = AccessControl.fromFile(file);
    writeFileSync(file, '{"sk-admin-0123456789": {"role": "adm'); // a half-saved edit
    expect(() => access.reload()).toThrow(`keys file ${file} is not valid JSON`);
    writeFileSync(file, JSON.stringify({ 'sk-alice-0123456789': { role: 'user', adapter: ['alice-*'] } }));
    expect(() => access.reload()).toThrow(`${file}: entry #1: unknown field "adapter"`);
    rmSync(file);
    expect(() => access.reload()).toThrow(`keys file ${file} cannot be read`);
    expect(access.size).toBe(2);
    expect(access.resolve('Bearer sk-admin-0123456789')).toMatchObject({ role: 'admin' });
    expect(access.resolve('Bearer sk-alice-0123456789')?.mayUse('alice-1')).toBe(true);
  });

  it('keys built from JSON have no file to reload', () => {
    const access = AccessControl.fromJson({ 'sk-admin-0123456789': { role: 'admin' } }, 'keys.json');
    expect(access.file).toBeNull();
    expect(() => access.reload()).toThrow('these keys were not read from a file, so there is nothing to reload');
  });
});
