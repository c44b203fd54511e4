/** Benchmark peers installed on demand into bench/.peers (git-ignored), never by `npm install`. */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

/**
 * Loads an npm package from bench/.peers, installing it first when missing.
 * Returns null with the reason when it cannot be had (offline, no binary for this platform).
 */
export function loadPeerPackage<T>(root: string, name: string): { module: T | null; error: string | null } {
  const prefix = join(root, 'bench', '.peers');
  const require = createRequire(join(prefix, 'package.json'));
  const attempt = (): T => require(name) as T;
  try {
    return { module: attempt(), error: null };
  } catch {
    // not installed yet
  }
  try {
    mkdirSync(prefix, { recursive: true });
    if (!existsSync(join(prefix, 'node_modules', name))) {
      process.stderr.write(`installing peer ${name} into bench/.peers …\n`);
      execFileSync('npm', ['install', '--prefix', prefix, name, '--ignore-scripts', '--no-save', '--no-audit', '--no-fund'],
        { stdio: ['ignore', 'ignore', 'pipe'], timeout: 300_000 });
    }
    return { module: attempt(), error: null };
  } catch (error) {
    return { module: null, error: error instanceof Error ? error.message.split('\n')[0]! : String(error) };
  }
}
