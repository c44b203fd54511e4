/**
 * Per-key access control. keys.json maps API keys to {role: "admin" | "user", adapters: [ids or
 * glob patterns]}. A user key reaches the base model and the adapters its patterns match; an admin
 * key reaches every adapter and the adapter-management routes. Keys are kept only as SHA-256 digests.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { SoppuError } from '../errors/soppu-error.js';

export type Role = 'admin' | 'user';

/** Who is calling: resolved once per request from the Authorization header. */
export interface Caller {
  readonly role: Role;
  /** Index of the key's entry in keys.json (for logs; never the key itself). */
  readonly keyIndex: number;
  /** True when the caller may use `adapterId` (the base model is always allowed). */
  mayUse(adapterId: string): boolean;
}

/** Every caller when no keys file is configured. */
export const OPEN_ACCESS_CALLER: Caller = { role: 'admin', keyIndex: -1, mayUse: () => true };

/** The fields an entry of keys.json may have; anything else (a typo such as "adapter") is an error. */
const ENTRY_FIELDS = ['role', 'adapters'] as const;

/** Whitespace or control characters: the Authorization parser (`Bearer <\S+>`) could never match such a key. */
const UNUSABLE_KEY_CHARACTER = /[\s\p{Cc}]/u;
/** What an API key may hold: printable ASCII, no space. */
const NOT_PRINTABLE_ASCII = /[^\x21-\x7e]/;

export class AccessControl {
  private byDigest: Map<string, Caller>;
  private currentWarnings: readonly string[];
  /** The keys file read by `fromFile` (what `reload` reads again), or null when built from JSON. */
  readonly file: string | null;

  private constructor(parsed: ParsedKeys, file: string | null) {
    this.byDigest = parsed.byDigest;
    this.currentWarnings = parsed.warnings;
    this.file = file;
  }

  /**
   * Setups that load but are probably mistakes (no keys at all, no admin key), one line each,
   * naming the file; `soppu serve` prints them at startup and after a reload.
   */
  get warnings(): readonly string[] {
    return this.currentWarnings;
  }

  /** Number of keys in the file. */
  get size(): number {
    return this.byDigest.size;
  }

  /**
   * Parses keys.json contents (already JSON-decoded); `file` names the source in errors. Errors name
   * the entry by its position (#1, #2, …), never by the key.
   */
  static fromJson(value: unknown, file: string): AccessControl {
    return new AccessControl(parseKeys(value, file), null);
  }

  static fromFile(file: string): AccessControl {
    return new AccessControl(readKeysFile(file), file);
  }

  /**
   * Reads the keys file again and swaps its keys in at once (a key added, removed or given other
   * adapters takes effect from the next request; a stream already running finishes). A file that
   * does not load changes nothing and throws its error, so a half-saved edit neither locks every
   * caller out nor opens access.
   */
  reload(): { readonly keys: number; readonly warnings: readonly string[] } {
    if (this.file === null) throw new SoppuError('CONFIG', 'these keys were not read from a file, so there is nothing to reload', { field: 'auth' });
    const parsed = readKeysFile(this.file);
    this.byDigest = parsed.byDigest;
    this.currentWarnings = parsed.warnings;
    return { keys: parsed.byDigest.size, warnings: parsed.warnings };
  }

  /** The caller for an Authorization header value, or null when the key is missing or unknown. */
  resolve(authorization: string | undefined): Caller | null {
    if (authorization === undefined) return null;
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    if (!match?.[1]) return null;
    return this.byDigest.get(digest(match[1])) ?? null;
  }
}

interface ParsedKeys {
  readonly byDigest: Map<string, Caller>;
  readonly warnings: readonly string[];
}

function readKeysFile(file: string): ParsedKeys {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new SoppuError('FILE_NOT_FOUND', `keys file ${file} cannot be read: ${(e as Error).message}`, { file }, { cause: e });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new SoppuError('CONFIG', `keys file ${file} is not valid JSON: ${(e as Error).message}`, { file }, { cause: e });
  }
  return parseKeys(value, file);
}

function parseKeys(value: unknown, file: string): ParsedKeys {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new SoppuError('CONFIG', `${file}: expected an object mapping API keys to {role, adapters}`, { file });
  }
  const byDigest = new Map<string, Caller>();
  let index = 0;
  let admins = 0;
  for (const [key, entry] of Object.entries(value as Record<string, unknown>)) {
    const where = `${file}: entry #${index + 1}`;
    if (key.length < 8) throw new SoppuError('CONFIG', `${where}: API key must be at least 8 characters`, { file, field: 'key', limit: 8 });
    // HTTP clients send headers as bytes: fetch and the openai client refuse a character past U+00FF outright, and
    // one past U+007F arrives as other bytes than the file's UTF-8 (a pasted "sk-admin-…" never authenticated)
    const outside = NOT_PRINTABLE_ASCII.exec(key);
    if (outside) {
      // whitespace and control characters are outside it too: they get the message that says so
      if (UNUSABLE_KEY_CHARACTER.test(key)) {
        throw new SoppuError('CONFIG', `${where}: API key contains whitespace or a control character, so no Authorization header can carry it`, { file, field: 'key' });
      }
      throw new SoppuError('CONFIG', `${where}: API key has a character outside printable ASCII (${JSON.stringify(outside[0])}), which an Authorization header cannot carry as written`, { file, field: 'key' });
    }
    if (entry === null || typeof entry !== 'object' || Array.isArray(entry)) throw new SoppuError('CONFIG', `${where}: expected {role, adapters}`, { file });
    const unknown = Object.keys(entry).filter((field) => !(ENTRY_FIELDS as readonly string[]).includes(field));
    if (unknown.length > 0) {
      const hint = unknown.length === 1 && unknown[0] === 'adapter' ? ' (did you mean "adapters"?)' : '';
      throw new SoppuError(
        'CONFIG',
        `${where}: unknown field${unknown.length > 1 ? 's' : ''} ${unknown.map((f) => JSON.stringify(f)).join(', ')}${hint}; an entry has only ${ENTRY_FIELDS.map((f) => `"${f}"`).join(' and ')}`,
        { file, field: unknown[0] },
      );
    }
    const { role, adapters } = entry as { role?: unknown; adapters?: unknown };
    if (role !== 'admin' && role !== 'user') {
      throw new SoppuError('CONFIG', `${where}: role must be "admin" or "user", got ${JSON.stringify(role)}`, { file, field: 'role' });
    }
    const patterns = adapters ?? [];
    if (!Array.isArray(patterns) || patterns.some((p) => typeof p !== 'string' || p.length === 0)) {
      throw new SoppuError('CONFIG', `${where}: adapters must be an array of non-empty id strings or glob patterns`, { file, field: 'adapters' });
    }
    const matchers = (patterns as string[]).map(globToRegExp);
    const keyIndex = index;
    const caller: Caller =
      role === 'admin'
        ? { role, keyIndex, mayUse: () => true }
        : { role, keyIndex, mayUse: (id) => id === '' || matchers.some((m) => m.test(id)) };
    byDigest.set(digest(key), caller);
    if (role === 'admin') admins += 1;
    index += 1;
  }
  const warnings: string[] = [];
  if (byDigest.size === 0) warnings.push(`${file} holds no keys: every request to an authenticated route will get 401`);
  else if (admins === 0) warnings.push(`${file} has no admin key: no caller can reach the adapter-management (admin) routes`);
  return { byDigest, warnings };
}

function digest(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

/** `*` matches any run of characters, `?` one character; everything else is literal. */
export function globToRegExp(pattern: string): RegExp {
  let source = '';
  for (const ch of pattern) {
    if (ch === '*') source += '.*';
    else if (ch === '?') source += '.';
    else source += ch.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${source}$`, 's');
}
