import { stat } from 'node:fs/promises';
import type { Command } from 'commander';
import { SoppuError } from '../../errors/soppu-error.js';
import { describeAdapter, describeSafetensors, type AdapterSummary, type SafetensorsSummary } from '../../io/describe-adapter.js';
import { loadLoraAdapter } from '../../io/load-lora-adapter.js';
import { openSafetensors } from '../../io/safetensors.js';
import { jsonText } from '../../io/snake-case-keys.js';

/** Left-aligned text table. */
function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  const line = (cells: readonly string[]) => cells.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

const number = (x: number) => (Number.isInteger(x) ? String(x) : x.toPrecision(6));

function printAdapter(s: AdapterSummary): void {
  const out: string[] = [
    `adapter:     ${s.source}`,
    `base model:  ${s.base_model ?? '(not set)'}`,
    `peft type:   ${s.peft_type}${s.use_rslora ? ' (rsLoRA)' : ''}`,
    `r / alpha:   ${s.r} / ${s.lora_alpha}  (ranks in file: ${s.ranks.join(', ')})`,
    `targets:     ${typeof s.target_modules === 'string' ? s.target_modules : s.target_modules.join(', ')}`,
    `dtype:       ${s.dtype}`,
    `modules:     ${s.modules.length}`,
    `parameters:  ${s.parameter_count}`,
    `flags:       ${s.flags.length ? s.flags.join(', ') : 'none'}`,
    '',
    table(
      ['module', 'rank', 'A shape', 'B shape', 'scale', '‖scale·B·A‖_F'],
      s.modules.map((m) => [m.path, String(m.rank), `[${m.rank}, ${m.in_features}]`, `[${m.out_features}, ${m.rank}]`, number(m.scale), m.delta_norm.toPrecision(6)]),
    ),
  ];
  if (s.passthrough.length) {
    out.push('', 'passthrough tensors:', table(['name', 'dtype', 'shape'], s.passthrough.map((p) => [p.name, p.dtype, `[${p.shape.join(', ')}]`])));
  }
  process.stdout.write(`${out.join('\n')}\n`);
}

function printSafetensors(s: SafetensorsSummary): void {
  const metadata = Object.entries(s.metadata);
  const out = [
    `file:        ${s.path}`,
    `tensors:     ${s.tensor_count}`,
    `data bytes:  ${s.data_bytes}`,
    `metadata:    ${metadata.length ? '' : 'none'}`,
    ...metadata.map(([k, v]) => `  ${k}: ${v}`),
    '',
    table(['name', 'dtype', 'shape', 'offsets'], s.tensors.map((t) => [t.name, t.dtype, `[${t.shape.join(', ')}]`, `[${t.data_offsets[0]}, ${t.data_offsets[1]})`])),
  ];
  process.stdout.write(`${out.join('\n')}\n`);
}

/** `soppu inspect <adapter-dir | file.safetensors> [--json]`. */
export function register(program: Command): void {
  program
    .command('inspect')
    .description('describe a PEFT LoRA adapter directory (modules, ranks, scales, ‖ΔW‖, flags) or a safetensors file (metadata, tensors)')
    .argument('<path>', 'adapter directory or .safetensors file')
    .option('--json', 'print JSON')
    .action(async (path: string, options: { json?: boolean }) => {
      let isDirectory: boolean;
      try {
        isDirectory = (await stat(path)).isDirectory();
      } catch {
        throw new SoppuError('FILE_NOT_FOUND', `${path}: no such file or directory`, { file: path });
      }
      let summary: AdapterSummary | SafetensorsSummary;
      if (isDirectory) summary = describeAdapter(await loadLoraAdapter(path));
      else {
        const file = await openSafetensors(path);
        try {
          summary = describeSafetensors(file);
        } finally {
          await file.close();
        }
      }
      if (options.json) process.stdout.write(jsonText(summary));
      else if (summary.kind === 'adapter') printAdapter(summary);
      else printSafetensors(summary);
    });
}
