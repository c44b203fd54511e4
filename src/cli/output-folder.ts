import { readdir, stat } from 'node:fs/promises';
import { SoppuError } from '../errors/soppu-error.js';

/**
 * Refuses an output folder that already holds files unless `force` (`flag` names the option that
 * chose it): a command that writes a model or an adapter replaces files of the same names and
 * deletes stale weights, so an existing folder's content (another adapter, a real model's shards)
 * is not overwritten by a typo.
 */
export async function refuseNonEmptyOutput(dir: string, force: boolean, flag: string): Promise<void> {
  const info = await stat(dir).catch(() => null);
  if (!info) return;
  if (!info.isDirectory()) throw new SoppuError('FILE_IO', `${flag} ${dir}: is a file, not a folder`, { file: dir, field: flag.replace(/^-+/, '') });
  if (force) return;
  const names = await readdir(dir);
  if (names.length === 0) return;
  const shown = names.slice(0, 3).join(', ') + (names.length > 3 ? ', …' : '');
  throw new SoppuError(
    'CONFIG',
    `${flag} ${dir} already holds files (${shown}); choose a new or empty folder, or pass --force to write into it`,
    { file: dir, field: flag.replace(/^-+/, '') },
  );
}
