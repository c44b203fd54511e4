#!/usr/bin/env node
/**
 * The `soppu` command. Thin: each subcommand lives in src/cli/commands/<name>.ts, exports
 * `register(program)`, and calls the library. Errors become one line on stderr and exit code 1
 * (2 for usage errors).
 */
import { Command, CommanderError } from 'commander';
import { isSoppuError } from '../errors/soppu-error.js';
import { removeUnfinishedWrites } from '../io/safetensors.js';
import { COMMANDS } from './commands/index.js';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('soppu')
    .description('Scalable One PEFT Per User: compress and serve thousands of LoRA adapters on one base model')
    .version('0.1.0')
    .showHelpAfterError()
    .exitOverride();
  for (const register of COMMANDS) register(program);
  return program;
}

export async function main(argv: readonly string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync([...argv], { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    if (isSoppuError(e)) {
      process.stderr.write(`soppu: error [${e.code}]: ${e.message}\n`);
      return 1;
    }
    process.stderr.write(`soppu: unexpected error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return 1;
  }
}

const invokedDirectly = process.argv[1] !== undefined && import.meta.url.endsWith(process.argv[1].replace(/^.*\/dist\//, '/dist/'));
if (invokedDirectly || process.argv[1]?.endsWith('/soppu') || process.argv[1]?.endsWith('main.js')) {
  // `soppu … | head` closes stdout early: that is the reader's choice, not an error.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw error;
  });
  // Ctrl-C / SIGTERM: remove the temp files of writes in progress, then exit as the signal would.
  // serve handles both itself (it drains running requests first).
  if (process.argv[2] !== 'serve') {
    for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
      process.once(signal, () => {
        removeUnfinishedWrites();
        process.exit(code);
      });
    }
  }
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
