/**
 * `bank rm`: takes one adapter out of a bank. The shared bases stay (other adapters multiply them; a
 * refit recomputes them); the adapter's own file leaves the manifest and is deleted one generation later,
 * so a server that opened the previous manifest can still load it until it reopens.
 */
import { SoppuError } from '../errors/soppu-error.js';
import type { BankManifest } from './bank-manifest.js';
import { openBank } from './bank-reader.js';
import { withBankLock } from './bank-lock.js';
import { commitManifest, refitReasonsOf } from './bank-writer.js';

/**
 * Removes adapter `id` from the bank in `dir`; returns the new manifest. Throws ADAPTER_NOT_FOUND when absent.
 * `keep`: older manifests whose files must stay (a server's requests still load from them).
 */
export async function removeFromBank(dir: string, id: string, options: { readonly keep?: readonly BankManifest[] } = {}): Promise<BankManifest> {
  return withBankLock(dir, async () => {
    const manifest = (await openBank(dir)).manifest;
    if (!manifest.adapters.some((a) => a.id === id)) {
      throw new SoppuError('ADAPTER_NOT_FOUND', `${dir}: the bank holds no adapter "${id}"`, { file: dir, field: 'id' });
    }
    const next = manifestWithout(manifest, id);
    await commitManifest(dir, next, manifest, options.keep);
    return next;
  });
}

/**
 * `manifest` less adapter `id` (if present), as the next generation: its file is dropped unless another
 * adapter names it, and the refit advice is recomputed over the adapters left.
 */
export function manifestWithout(manifest: BankManifest, id: string): BankManifest {
  const gone = manifest.adapters.find((a) => a.id === id);
  if (!gone) return manifest;
  const adapters = manifest.adapters.filter((a) => a !== gone);
  const files = { ...manifest.files };
  if (gone.file !== null && !adapters.some((a) => a.file === gone.file)) delete files[gone.file];
  const reasons = refitReasonsOf(adapters);
  return {
    ...manifest,
    generation: manifest.generation + 1,
    updatedAt: new Date().toISOString(),
    adapters,
    refitAdvised: reasons.length > 0,
    refitReasons: reasons,
    files,
  };
}
