/**
 * The reference kernel set: plain TypeScript, single-threaded, written to be read. It is the
 * specification every native variant is tested against.
 */
import type { KernelSet } from '../kernel-set.js';
import { matmul } from './matmul.js';
import { gemm } from './gemm.js';
import { add, addBias, argmax, embedding, logSumExp, rmsnorm, rope, siluMul, softmax } from './elementwise.js';
import { attention } from './attention.js';
import { loraApply, loraCore, loraExpand, loraRows, loraShrink, matmulGroup, matmulLora } from './lora.js';

export { ropeInvFreq, type RopeScaling } from './rope-inv-freq.js';

export const refKernels: KernelSet = {
  name: 'ref',
  matmul,
  gemmF32: gemm,
  gemmF64: gemm,
  rmsnorm,
  rope,
  softmax,
  logSumExp,
  argmax,
  siluMul,
  add,
  addBias,
  embedding,
  attention,
  loraShrink,
  loraExpand,
  loraCore,
  loraApply,
  matmulLora,
  matmulGroup,
  loraRows,
};
