import { unwatchFile, watchFile, type Stats } from 'node:fs';
import path from 'node:path';

/**
 * Calls `reload` when `<bankDir>/manifest.json` changes on disk (a `soppu bank add/rm/refit` beside the server),
 * checking every `intervalMs`: bank writers replace the manifest by rename, so its inode, size or mtime moves.
 * One reload at a time; a change seen while one runs is reloaded after it. Returns the function that stops it.
 */
export function watchBank(bankDir: string, intervalMs: number, reload: () => Promise<{ adapters: number }>, log: (line: string) => void): () => void {
  const manifest = path.join(bankDir, 'manifest.json');
  let running = false;
  let again = false;
  let stopped = false;
  const run = (): void => {
    if (running) {
      again = true;
      return;
    }
    running = true;
    reload().then(
      ({ adapters }) => log(`bank changed on disk: reloaded, ${adapters} adapter${adapters === 1 ? '' : 's'}`),
      (e: unknown) => log(`bank changed on disk, but the reload failed; the bank read before stays: ${e instanceof Error ? e.message : String(e)}`),
    ).finally(() => {
      running = false;
      if (again && !stopped) {
        again = false;
        run();
      }
    });
  };
  const listener = (current: Stats, previous: Stats): void => {
    if (current.ino === previous.ino && current.size === previous.size && current.mtimeMs === previous.mtimeMs) return;
    if (current.nlink === 0) return; // gone for a moment (or for good): the next manifest written is a change
    run();
  };
  // persistent: false, so the watch never keeps the process alive on its own
  watchFile(manifest, { interval: intervalMs, persistent: false }, listener);
  return () => {
    stopped = true;
    unwatchFile(manifest, listener);
  };
}
