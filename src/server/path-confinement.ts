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
  const notFound = (): SoppuError =>
    new SoppuError('ADAPTER_NOT_FOUND', `Adapter '${requested}' not found`, { field });
  if (roots.length === 0 || requested.length === 0 || requested.includes('\0')) throw notFound();
  const realRoots = roots.flatMap((root) => {
    try {
      return [realpathSync(root)];
    } catch {
      return [];
    }
  });
  const candidates = path.isAbsolute(requested) ? [requested] : realRoots.map((root) => path.join(root, requested));
  for (const candidate of candidates) {
    let real: string;
    try {
      real = realpathSync(candidate);
    } catch {
      continue;
    }
    if (realRoots.some((root) => real === root || real.startsWith(root + path.sep))) return real;
  }
  throw notFound();
}
