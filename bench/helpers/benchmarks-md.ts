/**
 * Writes one benchmark's section of BENCHMARKS.md between markers
 * `<!-- bench:<name>:start -->` and `<!-- bench:<name>:end -->`, appending the section when absent,
 * so each benchmark owns its section and leaves the others alone.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';

/** The repository root (dist/bench/helpers → three levels up, bench/helpers in ts → two). */
export function repositoryRoot(fromDir: string): string {
  let dir = fromDir;
  for (let i = 0; i < 6; i++) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    dir = join(dir, '..');
  }
  throw new Error(`package.json not found above ${fromDir}`);
}

export function writeBenchmarkSection(root: string, name: string, markdown: string): string {
  const file = join(root, 'BENCHMARKS.md');
  const start = `<!-- bench:${name}:start -->`;
  const end = `<!-- bench:${name}:end -->`;
  const block = `${start}\n${markdown.trim()}\n${end}`;
  let text = existsSync(file) ? readFileSync(file, 'utf8') : '# Benchmarks\n\nEach section is written by `npm run bench -- <name>`; the command and date are in the section.\n';
  const from = text.indexOf(start);
  const to = text.indexOf(end);
  if (from >= 0 && to > from) text = text.slice(0, from) + block + text.slice(to + end.length);
  else text = `${text.trimEnd()}\n\n${block}\n`;
  writeFileSync(file, text);
  return file;
}

/** One line naming the machine: CPU model, logical cores, memory, kernel. */
export function machineDescription(): string {
  const cpuList = cpus();
  let model = cpuList[0]?.model ?? 'unknown CPU';
  try {
    const flags = readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:\s*(.*)$/m)?.[1]?.split(' ') ?? [];
    const isa = ['avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'].filter((f) => flags.includes(f));
    model += ` (${isa.join(', ')})`;
  } catch {
    // not Linux: the model name alone
  }
  return `${model}, ${cpuList.length} logical cores, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}`;
}
