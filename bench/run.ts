/**
 * `npm run bench -- <name> [args…]`: runs bench/<name>.ts (compiled to dist/bench/<name>.js), which
 * exports `run(args: string[]): Promise<void>`. Benchmarks are found by name at run time, so adding
 * one is adding a file. With no name (or an unknown one) it lists what is available.
 */
import { readdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { join } from 'node:path';

interface BenchModule {
  run(args: string[]): Promise<void>;
}

const here = dirname(fileURLToPath(import.meta.url));

/** Benchmark names: the compiled .js files next to this one that are not the runner itself. */
function availableBenchmarks(): string[] {
  return readdirSync(here)
    .filter((file) => file.endsWith('.js') && file !== 'run.js')
    .map((file) => file.slice(0, -3))
    .sort();
}

async function main(): Promise<void> {
  const [name, ...args] = process.argv.slice(2);
  const available = availableBenchmarks();
  if (!name || !available.includes(name)) {
    if (name) process.stderr.write(`unknown benchmark "${name}"\n`);
    process.stdout.write(`usage: npm run bench -- <name> [args]\navailable: ${available.join(', ')}\n`);
    process.exitCode = name ? 1 : 0;
    return;
  }
  const module = (await import(pathToFileURL(join(here, `${name}.js`)).href)) as Partial<BenchModule>;
  if (typeof module.run !== 'function') throw new Error(`bench/${name}.ts does not export run(args)`);
  await module.run(args);
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
  process.exitCode = 1;
});
