import type { Command } from 'commander';
import { register as info } from './info.js';

/** Every subcommand's register function; add one line per new command file. */
export const COMMANDS: ReadonlyArray<(program: Command) => void> = [info];
