/**
 * Confines user-supplied adapter paths to the configured directories: the real path (symlinks
 * resolved) must lie inside one of them, so `..` and symlinks cannot escape.
 */
import { realpathSync } from 'node:fs';
import path from 'node:path';
import { SoppuError } from '../errors/soppu-error.js';

/**
 * Resolves `requested` (absolute, or relative to the first directory) to a real path inside one of
 * `roots`. Throws ADAPTER_NOT_FOUND with a message that does not reveal the filesystem layout.
 */
export function confinePath(requested: string, roots: readonly string[], field: string): string {
  return confineAdapterPath(requested, roots, field).path;
}

/** The real paths of the roots that exist (a root that is gone has none). */
function realPaths(roots: readonly string[]): string[] {
  return roots.flatMap((root) => {
    try {
      return [realpathSync(root)];
    } catch {
      return [];
    }
  });
}

/**
 * confinePath, and the adapter id the real path stands for: its path below the root that holds it, with
 * '/' separators. Access is decided on that id, since the requested text may reach the same folder by
 * another name (`alice-x/../bob-1`, a symlink in alice's folder to bob's).
 */
export function confineAdapterPath(requested: string, roots: readonly string[], field: string): { path: string; id: string } {
  const notFound = (): SoppuError =>
    new SoppuError('ADAPTER_NOT_FOUND', `Adapter '${requested}' not found`, { field });
  if (roots.length === 0 || requested.length === 0 || requested.includes('\0')) throw notFound();
  const realRoots = realPaths(roots);
  const candidates = path.isAbsolute(requested) ? [requested] : realRoots.map((root) => path.join(root, requested));
  for (const candidate of candidates) {
    let real: string;
    try {
      real = realpathSync(candidate);
    } catch {
      continue;
    }
    const root = realRoots.find((r) => real === r || real.startsWith(r + path.sep));
    if (root) return { path: real, id: path.relative(root, real).split(path.sep).join('/') };
  }
  throw notFound();
}

/**
 * `text` with every adapter root's path (as configured, and as its real path) and the separator after it left
 * out: a load error for a local adapter then names its files as the caller named the folder, not where the
 * server keeps them.
 */
export function withoutRoots(text: string, roots: readonly string[]): string {
  // a root that is gone: its configured path alone
  const prefixes = new Set([...roots.map((root) => path.resolve(root)), ...realPaths(roots)].map((root) => root + path.sep));
  // longest first, so a root inside another is taken whole
  return [...prefixes].sort((p, q) => q.length - p.length).reduce((out, prefix) => out.split(prefix).join(''), text);
}
