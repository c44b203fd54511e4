/**
 * The q/k row permutation llama.cpp's convert_hf_to_gguf applies for the llama architecture:
 * HF checkpoints rotate pairs (i, i + D/2) of each head ("rotate_half"); GGML's normal rope rotates
 * adjacent pairs (2i, 2i + 1). Per head the rows are reordered so that
 *   out[h·D + 2j + t] = in[h·D + t·D/2 + j]   (t ∈ {0, 1}, j < D/2)
 * which is Python's `w.reshape(n_head, 2, D/2, K).swapaxes(1, 2).reshape(w.shape)`.
 * Works on any element type: whole rows move.
 */
import { SoppuError } from '../../errors/soppu-error.js';

/** Returns a new array with the rows of `data` ([rows, cols] row-major) permuted for `numHeads` heads. */
export function permuteRopeRows<T extends Float32Array | Uint16Array>(data: T, rows: number, cols: number, numHeads: number, what = 'tensor'): T {
  const headDim = rows / numHeads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0 || data.length !== rows * cols) {
    throw new SoppuError('MODEL_WEIGHTS', `${what}: cannot permute [${rows}, ${cols}] (${data.length} elements) for rope with ${numHeads} heads (rows must split into heads of even size)`, { tensor: what });
  }
  const half = headDim / 2;
  const out = new (data.constructor as new (n: number) => T)(data.length);
  for (let h = 0; h < numHeads; h++) {
    for (let j = 0; j < half; j++) {
      for (let t = 0; t < 2; t++) {
        const source = h * headDim + t * half + j;
        const target = h * headDim + 2 * j + t;
        out.set(data.subarray(source * cols, (source + 1) * cols), target * cols);
      }
    }
  }
  return out;
}
