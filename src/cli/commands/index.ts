import type { Command } from 'commander';
import { register as info } from './info.js';
import { register as inspect } from './inspect.js';
import { register as fixtures } from './fixtures.js';
import { register as generate } from './generate.js';
import { register as compress } from './compress.js';
import { register as bank } from './bank.js';
import { register as verify } from './verify.js';
import { register as exportCommand } from './export.js';
import { register as report } from './report.js';
import { register as exportGguf } from './export-gguf.js';
import { register as serve } from './serve.js';

/** Every subcommand's register function; add one line per new command file. */
export const COMMANDS: ReadonlyArray<(program: Command) => void> = [info, inspect, fixtures, generate, compress, bank, verify, exportCommand, report, exportGguf, serve];
