/**
 * `soppu export`: writes one bank adapter as a standard PEFT adapter directory whose ΔW equals the
 * bank's reconstruction: compressed slots B = U·Σ [out, R], A = Vᵀ [R, in]; raw slots as stored (scale
 * already folded into B). Every module has scale 1 (lora_alpha = r per module, via rank_pattern /
 * alpha_pattern where ranks differ), so PEFT, LoRAX and vLLM reproduce ΔW = B·A exactly.
 */
import { SoppuError } from '../errors/soppu-error.js';
import { saveLoraAdapter } from '../io/save-lora-adapter.js';
import type { WeightDtype } from '../tensor/dtype.js';
import { adapterFromBank } from './bank-source.js';
import type { Bank } from './bank-reader.js';

export interface ExportAdapterOptions {
  /** dtype of the written factors (default f32). */
  readonly dtype?: WeightDtype;
}

export interface ExportSummary {
  readonly id: string;
  readonly dir: string;
  readonly modules: number;
  readonly zeroSlots: number;
  readonly dtype: WeightDtype;
}

export async function exportAdapter(bank: Bank, id: string, outDir: string, options: ExportAdapterOptions = {}): Promise<ExportSummary> {
  const dtype = options.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'bf16' && dtype !== 'f16') throw new SoppuError('CONFIG', `--dtype must be f32, bf16 or f16, got ${JSON.stringify(dtype)}`, { field: 'dtype' });
  const entry = bank.adapter(id);
  const adapter = await adapterFromBank(bank, id);
  // zero slots carry nothing: PEFT initialises a missing B to zero, so leaving them out keeps ΔW = 0
  const zeroPaths = Object.entries(entry.perSlot).filter(([, p]) => p.storage === 'zero').map(([path]) => path);
  const modules = new Map([...adapter.modules].filter(([path]) => !zeroPaths.includes(path)));
  if (modules.size === 0) throw new SoppuError('ADAPTER_TENSORS', `adapter ${id}: every slot is zero (ΔW = 0); there is nothing to export`, { field: 'adapter_id' });
  await saveLoraAdapter(outDir, { ...adapter, modules }, { dtype });
  return { id, dir: outDir, modules: modules.size, zeroSlots: zeroPaths.length, dtype };
}
