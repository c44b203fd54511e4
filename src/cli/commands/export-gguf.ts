import { existsSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { SoppuError } from '../../errors/soppu-error.js';
import { exportGgufLora } from '../../io/gguf/export-gguf-lora.js';
import { exportGgufModel, type GgufOutputType } from '../../io/gguf/export-gguf-model.js';

/** `soppu export-gguf --model DIR -o model.gguf [--dtype bf16]`, or `--lora PEFT_DIR` for a GGUF LoRA adapter. */
export function register(program: Command): void {
  program
    .command('export-gguf')
    .description('write a Llama model folder (or, with --lora, a PEFT LoRA adapter of it) as a GGUF file llama.cpp loads')
    .requiredOption('--model <dir>', 'model directory (config.json, model.safetensors, tokenizer.json)')
    .requiredOption('-o, --output <file>', 'output .gguf file')
    .option('--dtype <dtype>', 'matrix type of the model file: f32, f16 or bf16 (default: as stored)')
    // the first name it had; --dtype as every other command spells it
    .addOption(new Option('--type <dtype>').hideHelp())
    .option('--lora <dir>', 'export this PEFT adapter directory as a GGUF LoRA adapter instead of the model')
    .option('--force', 'replace an existing output file')
    .action(async (options: { model: string; output: string; dtype?: string; type?: string; lora?: string; force?: boolean }) => {
      // as export and report: an existing file is replaced only when asked (-o model/model.safetensors destroyed the
      // model it was reading), and the output is a .gguf
      if (!options.output.toLowerCase().endsWith('.gguf')) {
        throw new SoppuError('CONFIG', `-o ${options.output}: the output must be a .gguf file`, { field: 'output', file: options.output });
      }
      if (existsSync(options.output) && !options.force) {
        throw new SoppuError('CONFIG', `-o ${options.output} exists: choose another name, or pass --force to replace it`, { field: 'output', file: options.output });
      }
      const flag = options.dtype !== undefined ? '--dtype' : '--type';
      const dtype = options.dtype ?? options.type;
      if (dtype !== undefined && !['f32', 'f16', 'bf16'].includes(dtype)) {
        throw new SoppuError('CONFIG', `${flag} must be f32, f16 or bf16, got "${dtype}"`, { field: flag.slice(2) });
      }
      if (options.lora !== undefined) {
        if (dtype !== undefined) throw new SoppuError('CONFIG', `${flag} applies to the model file only (LoRA factors are written as f32)`, { field: flag.slice(2) });
        const result = await exportGgufLora({ modelDir: options.model, adapterDir: options.lora, out: options.output });
        process.stdout.write(`wrote ${result.path}: GGUF LoRA adapter, ${result.tensors} tensors, ${result.bytes} bytes\n`);
        return;
      }
      const result = await exportGgufModel({ modelDir: options.model, out: options.output, ...(dtype ? { type: dtype as GgufOutputType } : {}) });
      process.stdout.write(`wrote ${result.path}: ${result.tensors} tensors (${result.type}), ${result.bytes} bytes\n`);
    });
}
