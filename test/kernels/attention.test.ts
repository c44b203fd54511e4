import { describe, expect, it } from 'vitest';
import { refKernels } from '../../src/kernels/index.js';
import type { AttentionArgs } from '../../src/kernels/kernel-set.js';
import { isSoppuError } from '../../src/errors/soppu-error.js';
import { Random } from '../../src/tensor/random.js';
import { expectClose, expectRowsUntouched, nativeSets, offsetCopy, randomArray } from './ops-compare.js';

interface SequenceSpec {
  /** New query rows of the sequence in this batch. */
  qLen: number;
  /** Context length (the new rows included). */
  ctxLen: number;
}

interface AttentionCase {
  name: string;
  heads: number;
  kvHeads: number;
  headDim: number;
  blockSize: number;
  sequences: SequenceSpec[];
  /** Leave one unused query row between sequences (rows no sequence owns must stay untouched). */
  gaps?: boolean;
}

const CASES: AttentionCase[] = [
  { name: 'odd: D 6, block 5, 3/1 heads, prefill+decode', heads: 3, kvHeads: 1, headDim: 6, blockSize: 5, sequences: [{ qLen: 7, ctxLen: 7 }, { qLen: 1, ctxLen: 12 }], gaps: true },
  { name: 'odd: D 40, block 20 (a 16-position chunk and a tail), 4/2 heads', heads: 4, kvHeads: 2, headDim: 40, blockSize: 20, sequences: [{ qLen: 3, ctxLen: 45 }, { qLen: 1, ctxLen: 21 }] },
  { name: 'odd: D 1, block 1', heads: 2, kvHeads: 2, headDim: 1, blockSize: 1, sequences: [{ qLen: 3, ctxLen: 4 }] },
  { name: 'SmolLM 9/3 D 64 prefill', heads: 9, kvHeads: 3, headDim: 64, blockSize: 16, sequences: [{ qLen: 20, ctxLen: 20 }] },
  { name: 'SmolLM 9/3 D 64 decode ×3', heads: 9, kvHeads: 3, headDim: 64, blockSize: 16, sequences: [{ qLen: 1, ctxLen: 37 }, { qLen: 1, ctxLen: 1 }, { qLen: 1, ctxLen: 16 }] },
  { name: 'Qwen 14/2 D 64 mixed', heads: 14, kvHeads: 2, headDim: 64, blockSize: 16, sequences: [{ qLen: 5, ctxLen: 5 }, { qLen: 1, ctxLen: 50 }, { qLen: 3, ctxLen: 19 }], gaps: true },
  { name: 'Qwen 14/2 D 64 one decode row (group split over tasks)', heads: 14, kvHeads: 2, headDim: 64, blockSize: 8, sequences: [{ qLen: 1, ctxLen: 29 }] },
  { name: 'Llama 32/8 D 128 mixed', heads: 32, kvHeads: 8, headDim: 128, blockSize: 32, sequences: [{ qLen: 4, ctxLen: 40 }, { qLen: 1, ctxLen: 70 }] },
];

/** A batch over a KV cache whose blocks are handed out in shuffled (non-contiguous) order. */
function buildCase(spec: AttentionCase, rng: Random): { args: AttentionArgs; rows: number; gapRows: number[] } {
  const { heads, kvHeads, headDim, blockSize, sequences } = spec;
  const blocksPerSeq = sequences.map((s) => Math.ceil(s.ctxLen / blockSize));
  const numBlocks = blocksPerSeq.reduce((a, b) => a + b, 0) + 3; // spare blocks never referenced
  const order = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const blockTable = new Int32Array(blocksPerSeq.reduce((a, b) => a + b, 0) + 2);
  blockTable.fill(-7); // padding entries that must never be read
  const blockTableStart = new Int32Array(sequences.length);
  const qStart = new Int32Array(sequences.length);
  const qLen = new Int32Array(sequences.length);
  const ctxLen = new Int32Array(sequences.length);
  const gapRows: number[] = [];
  let row = 0;
  let tableAt = 1;
  let nextBlock = 0;
  sequences.forEach((s, index) => {
    blockTableStart[index] = tableAt;
    for (let j = 0; j < blocksPerSeq[index]!; j++) blockTable[tableAt++] = order[nextBlock++]!;
    qStart[index] = row;
    qLen[index] = s.qLen;
    ctxLen[index] = s.ctxLen;
    row += s.qLen;
    if (spec.gaps) gapRows.push(row++);
  });
  const rows = row;
  const cacheSize = numBlocks * blockSize * kvHeads * headDim;
  const args: AttentionArgs = {
    out: randomArray(rng, rows * heads * headDim),
    q: randomArray(rng, rows * heads * headDim),
    kCache: randomArray(rng, cacheSize),
    vCache: randomArray(rng, cacheSize),
    blockTable, blockTableStart, qStart, qLen, ctxLen,
    seqs: sequences.length, heads, kvHeads, headDim, blockSize,
    scale: 1 / Math.sqrt(headDim),
  };
  return { args, rows, gapRows };
}

it('the addon provides native attention in every supported variant', () => {
  expect(nativeSets.length).toBeGreaterThan(0);
  for (const set of nativeSets) expect(set.attention).not.toBe(refKernels.attention);
});

describe.each(nativeSets.map((set) => [set.name, set] as const))('%s attention vs ref', (_name, native) => {
  it.each(CASES.map((c) => [c.name, c] as const))('%s', (_caseName, spec) => {
    const rng = new Random(7);
    const { args, gapRows } = buildCase(spec, rng);
    const want = args.out.slice();
    refKernels.attention({ ...args, out: want });
    const original = args.out.slice();
    const out = offsetCopy(args.out);
    native.attention({
      ...args,
      out,
      q: offsetCopy(args.q),
      kCache: offsetCopy(args.kCache),
      vCache: offsetCopy(args.vCache),
      blockTable: offsetCopy(args.blockTable),
    });
    expectClose(out, want, 2e-5, spec.name);
    expectRowsUntouched(out, original, spec.heads * spec.headDim, gapRows, spec.name);
  });

  it('rejects bad block ids, lengths and shapes with KERNEL errors naming the op', () => {
    const { args } = buildCase(CASES[0]!, new Random(3));
    const expectKernelError = (bad: AttentionArgs, pattern: RegExp): void => {
      try {
        native.attention(bad);
        expect.fail('accepted bad attention arguments');
      } catch (e) {
        expect(isSoppuError(e, 'KERNEL')).toBe(true);
        expect((e as Error).message).toMatch(pattern);
      }
    };
    const table = args.blockTable.slice();
    table[args.blockTableStart[1]!] = 1000;
    expectKernelError({ ...args, blockTable: table }, /attention: sequence 1: block id 1000 .*outside the cache/);
    expectKernelError({ ...args, ctxLen: Int32Array.from([7, 0]) }, /attention: sequence 1: .*qLen <= ctxLen/);
    expectKernelError({ ...args, q: args.q.subarray(0, 10) }, /attention: q has 10 elements/);
    expectKernelError({ ...args, kvHeads: 2 }, /attention: heads 3 is not a multiple of kvHeads 2/);
    expectKernelError({ ...args, blockTableStart: Int32Array.from([1, args.blockTable.length]) }, /attention: blockTable has/);
  });
});
