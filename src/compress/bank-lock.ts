/**
 * The bank's writer lock. One writer at a time changes a bank:
 *   - within a process, callers on one directory queue behind each other (a server registering two
 *     adapters with `compress` at once: both land, one after the other);
 *   - across processes, `<bank>/.lock` names its holder (pid and a random token). A live holder's lock
 *     is a BANK_CONFLICT for the other process; a dead holder's (a writer killed with SIGKILL) is taken
 *     over.
 * The lock file appears whole: it is written under a temporary name and linked into place, which fails
 * when a lock exists, so no writer ever reads a lock that is still empty and takes it for a dead one's.
 * A dead holder's lock is replaced in place (one rename over it) by the one writer that creates its
 * takeover marker, so writers racing to take it over cannot both succeed, and none can create a fresh
 * lock while it is being replaced.
 */
import { createHash, randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { link, mkdir, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';

const LOCK_NAME = '.lock';
/** Attempts to create the lock file before giving up (each failed one removed a dead holder's lock). */
const MAX_ATTEMPTS = 8;

/** Per bank directory (its device and inode), the tail of this process's queue of lock holders. */
const queues = new Map<string, Promise<unknown>>();
/** The tokens of this process's locks and takeovers in progress: a lock or marker of this pid is live iff listed. */
const liveTokens = new Set<string>();

/**
 * Runs `fn` holding the bank's lock (see the module comment); the lock is released when it settles.
 * `create` makes the folder (a new bank); else a folder that does not exist is FILE_NOT_FOUND, and a
 * mistyped bank path is not left behind as an empty folder.
 */
export async function withBankLock<T>(dir: string, fn: () => Promise<T>, options: { create?: boolean } = {}): Promise<T> {
  // one queue per folder however it is named (a symlink, a bind mount): keyed by its device and inode, read
  // synchronously so that callers queue in call order
  let info: ReturnType<typeof statSync> | undefined;
  try {
    info = statSync(dir, { throwIfNoEntry: false });
  } catch {
    info = undefined; // a path under a file: withLockFile names the problem
  }
  const key = info ? `${info.dev}:${info.ino}` : resolve(dir);
  const previous = queues.get(key) ?? Promise.resolve();
  const run = previous.catch(() => undefined).then(() => withLockFile(dir, fn, options.create === true));
  const tail = run.catch(() => undefined);
  queues.set(key, tail);
  try {
    return await run;
  } finally {
    if (queues.get(key) === tail) queues.delete(key);
  }
}

async function withLockFile<T>(dir: string, fn: () => Promise<T>, create: boolean): Promise<T> {
  if (create) {
    try {
      await mkdir(dir, { recursive: true });
    } catch (e) {
      throw new SoppuError('FILE_IO', `${dir}: cannot create the bank folder (${(e as Error).message})`, { file: dir }, { cause: e });
    }
  }
  const info = await stat(dir).catch(() => null);
  if (!info) throw new SoppuError('FILE_NOT_FOUND', `${join(dir, 'manifest.json')}: no bank here (the folder ${dir} does not exist)`, { file: dir });
  if (!info.isDirectory()) throw new SoppuError('FILE_IO', `${dir}: is a file, not a bank folder`, { file: dir });
  const lockPath = join(dir, LOCK_NAME);
  const token = `${process.pid} ${randomBytes(8).toString('hex')}\n`;
  liveTokens.add(token);
  try {
    try {
      await takeLock(dir, lockPath, token);
    } catch (e) {
      if (e instanceof SoppuError) throw e;
      throw new SoppuError('FILE_IO', `${dir}: cannot take the bank lock (${(e as Error).message})`, { file: dir }, { cause: e });
    }
    try {
      return await fn();
    } finally {
      // only our own lock: never one that a writer which judged us dead has put in its place
      if ((await readFile(lockPath, 'utf8').catch(() => null)) === token) await unlink(lockPath).catch(() => undefined);
    }
  } finally {
    liveTokens.delete(token);
  }
}

async function takeLock(dir: string, lockPath: string, token: string): Promise<void> {
  for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
    if (await createWhole(lockPath, token)) return;
    const seen = await readFile(lockPath, 'utf8').catch(() => null);
    if (seen === null) continue; // released in the meantime
    if (holderAlive(seen)) {
      throw new SoppuError('BANK_CONFLICT', `${dir}: bank is being changed by process ${Number.parseInt(seen, 10)} (lock file ${lockPath}); retry when it finishes`, { file: lockPath });
    }
    // A dead writer's lock: the one writer that creates its takeover marker (named by the lock's content, so
    // one per dead lock) replaces it. The dead lock is never removed, so no other writer can create a lock
    // meanwhile, and the replacement is one rename over it.
    const markers = await claimTakeover(lockPath, seen, token);
    if (markers === null) continue; // another writer is taking it over
    const marker = markers[markers.length - 1]!;
    try {
      // still the lock judged dead? (a marker that garbage collection removed could be created again later)
      if ((await readFile(lockPath, 'utf8').catch(() => null)) !== seen) continue;
      const temp = tempName(lockPath);
      await writeFile(temp, token, { flag: 'wx' });
      await rename(temp, lockPath).catch(async (e: unknown) => {
        await unlink(temp).catch(() => undefined);
        throw new SoppuError('FILE_IO', `${lockPath}: cannot replace a dead writer's bank lock (${(e as Error).message})`, { file: lockPath }, { cause: e });
      });
      // the dead takeovers' markers too: a writer that creates one again finds the lock replaced
      for (const dead of markers.slice(0, -1)) await unlink(dead).catch(() => undefined);
      return;
    } finally {
      await unlink(marker).catch(() => undefined);
    }
  }
  throw new SoppuError('BANK_CONFLICT', `${lockPath}: could not take the bank lock in ${MAX_ATTEMPTS} attempts (writers keep replacing it); retry`, { file: lockPath });
}

/** Markers a dead lock's takeovers may leave before one succeeds (each one's writer died mid-takeover). */
const MAX_TAKEOVERS = 8;

/**
 * Claims the takeover of the dead lock whose content is `seen`: creates its marker `<lock>.tmp-<k>-<hash of seen>`
 * for the first k whose marker does not exist, while every earlier one's writer is dead (a writer killed during
 * its takeover, whose marker would otherwise stop every later one). Creation is exclusive, so one writer wins
 * each k. Returns the markers 0..k (the last one this writer's), or null when a live writer holds one or its
 * marker went away (its takeover finished).
 */
async function claimTakeover(lockPath: string, seen: string, token: string): Promise<string[] | null> {
  const hash = createHash('sha256').update(seen).digest('hex').slice(0, 16);
  const markers: string[] = [];
  for (let k = 0; k < MAX_TAKEOVERS; k++) {
    const marker = `${lockPath}.tmp-${k}-${hash}`;
    markers.push(marker);
    if (await createWhole(marker, token)) return markers;
    const holder = await readFile(marker, 'utf8').catch(() => null);
    if (holder === null || holderAlive(holder)) return null;
  }
  throw new SoppuError('BANK_CONFLICT', `${lockPath}: ${MAX_TAKEOVERS} writers died taking over a dead writer's lock; if no soppu process is changing this bank, remove ${lockPath} and its ${lockPath}.tmp-* files`, { file: lockPath });
}

/**
 * True when the holder a lock or marker names is alive: another live process, or a lock or takeover of this
 * process still in progress (another path to the same folder); this process's other tokens are leftovers.
 */
function holderAlive(content: string): boolean {
  const owner = Number.parseInt(content, 10);
  if (owner === process.pid) return liveTokens.has(content);
  return Number.isInteger(owner) && owner > 0 && processAlive(owner);
}

/** A name beside `path` that the bank's garbage collection removes if a crash leaves it (collectGarbage). */
function tempName(path: string): string {
  return `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
}

/** Creates `path` holding `content`, whole, unless it exists (false). */
async function createWhole(path: string, content: string): Promise<boolean> {
  const temp = tempName(path);
  let written = false;
  try {
    await writeFile(temp, content, { flag: 'wx' });
    written = true;
    await link(temp, path);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // ENOENT from link: the holder's garbage collection took our temp file (it removes temp files): held
    if (code === 'EEXIST' || (written && code === 'ENOENT')) return false;
    throw new SoppuError('FILE_IO', `${path}: cannot create the bank lock (${(e as Error).message})`, { file: path }, { cause: e });
  } finally {
    await unlink(temp).catch(() => undefined);
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
