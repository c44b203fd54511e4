/** GGUF export (llama.cpp's file format): the writer, the model exporter and the LoRA adapter exporter. */
export type { GgmlTypeName, GgufTensor, GgufValue, SerializedGguf } from './gguf-writer.js';
export { GGML_TYPE, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VALUE_TYPE, GGUF_VERSION, serializeGguf, writeGguf } from './gguf-writer.js';
export type { ExportedGguf, ExportGgufModelOptions, GgufOutputType } from './export-gguf-model.js';
export { checkGgufExportable, exportGgufModel, GGUF_MODULE_NAMES, llamaGgufMetadata } from './export-gguf-model.js';
export type { ExportGgufLoraOptions } from './export-gguf-lora.js';
export { exportGgufLora, ggufLoraContent } from './export-gguf-lora.js';
export { ggufTokenizerMetadata } from './gguf-tokenizer-metadata.js';
export { permuteRopeRows } from './permute-rope-rows.js';
