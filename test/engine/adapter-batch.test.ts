import { describe, expect, it } from 'vitest';
import { AdapterBatcher, compareAdapters, type BatchSegmentCounts } from '../../src/engine/adapter-batch.js';
import { slotShapeOf } from '../../src/engine/engine.js';
import { KvBlockPool } from '../../src/engine/kv-block-pool.js';
import { residentBases, residentFromBank, residentFromLora, slotKey, type ResidentAdapter, type ResidentBases } from '../../src/engine/resident-adapter.js';
import { getKernels } from '../../src/kernels/index.js';
import { contiguousBatch, forward } from '../../src/model/forward.js';
import { TARGET_MODULES } from '../../src/model/adapter-hook.js';
import type { LlamaModel } from '../../src/model/llama-model.js';
import { Random } from '../../src/tensor/random.js';
import { handBank, mergedModel, randomLora, tinyModel } from './helpers.js';

const kernels = getKernels();

function freshPool(model: LlamaModel): KvBlockPool {
  const c = model.config;
  return new KvBlockPool({ layers: c.numLayers, kvHeads: c.numKvHeads, headDim: c.headDim, blockSize: 8 }, 64 * c.numLayers * c.numKvHeads * c.headDim * 8 * 8);
}

/** Prefill logits of every row, then the logits of one decode step. */
function run(model: LlamaModel, adapter: ResidentAdapter | null, prompt: number[], next: number): { prefill: Float32Array; decode: Float32Array } {
  const pool = freshPool(model);
  const batcher = new AdapterBatcher();
  const prefillBatch = contiguousBatch([{ tokens: prompt, pastLength: 0, firstBlock: 0 }], 8, 'all');
  const prefill = forward(model, kernels, prefillBatch, pool.storage, batcher.hook(new Array(prompt.length).fill(adapter)), undefined);
  const decodeBatch = contiguousBatch([{ tokens: [next], pastLength: prompt.length, firstBlock: 0 }], 8);
  const decode = forward(model, kernels, decodeBatch, pool.storage, batcher.hook([adapter]), undefined);
  return { prefill, decode };
}

function maxRelativeDifference(p: Float32Array, q: Float32Array): number {
  let worst = 0;
  let scale = 0;
  for (let i = 0; i < p.length; i++) {
    worst = Math.max(worst, Math.abs(p[i]! - q[i]!));
    scale = Math.max(scale, Math.abs(q[i]!));
  }
  return worst / scale;
}

/** A bank adapter made resident; `loaded` shares cluster bases between adapters, as the engine's cache does. */
async function bankResident(bank: ReturnType<typeof handBank>, id: string, model: LlamaModel,
  loaded = new Map<string, ResidentBases>()): Promise<ResidentAdapter> {
  const parts = await bank.reader.loadAdapter(id);
  for (const part of parts.slots.values()) {
    if (part.kind === 'compressed' && !loaded.has(part.basesKey)) loaded.set(part.basesKey, residentBases(await bank.reader.loadBases(part.basesKey)));
  }
  return residentFromBank(parts, loaded, slotShapeOf(model.config), bank.reader.dir);
}

describe('adapter batching', () => {
  const model = tinyModel(11);
  const prompt = [0, 5, 9, 14, 3, 22, 40, 7, 12, 30, 2];

  it('a raw adapter equals the merged model W + s·B·A, in prefill and in decode', () => {
    const lora = randomLora(model.config, 21, 4, 16);
    const resident = residentFromLora('raw', lora, slotShapeOf(model.config));
    const viaHook = run(model, resident, prompt, 17);
    const merged = run(mergedModel(model, lora), null, prompt, 17);
    const base = run(model, null, prompt, 17);
    expect(maxRelativeDifference(viaHook.prefill, merged.prefill)).toBeLessThan(1e-4);
    expect(maxRelativeDifference(viaHook.decode, merged.decode)).toBeLessThan(1e-4);
    // and the adapter really changes the output
    expect(maxRelativeDifference(base.prefill, merged.prefill)).toBeGreaterThan(1e-2);
  });

  it("only the decoder's own layers are slots, and each takes one module: a vision tower's layer or a second copy is refused, not swapped in", () => {
    const lora = randomLora(model.config, 22, 2, 4);
    const q = lora.modules.get('model.layers.0.self_attn.q_proj')!;
    const withModule = (path: string) => ({ ...lora, modules: new Map([...lora.modules, [path, { ...q, path }]]) });
    expect(() => residentFromLora('vision', withModule('model.vision_tower.encoder.layers.0.self_attn.q_proj'), slotShapeOf(model.config)))
      .toThrow(/module model\.vision_tower\.encoder\.layers\.0\.self_attn\.q_proj is not a linear layer of the base model/);
    expect(() => residentFromLora('twice', withModule('layers.0.self_attn.q_proj'), slotShapeOf(model.config)))
      .toThrow(/module layers\.0\.self_attn\.q_proj adapts a layer another of its modules already adapts \(slot 0\.q_proj\)/);
  });

  for (const diagonal of [false, true]) {
    it(`a compressed adapter (${diagonal ? 'diagonal' : 'full'} core) equals the same adapter exported raw`, async () => {
      const bank = handBank(model.config, { clusters: 2, perCluster: 2, rank: 3, seed: 5, diagonal });
      const compressed = await bankResident(bank, 'c1-0', model);
      const raw = residentFromLora('c1-0-raw', bank.exportRaw('c1-0'), slotShapeOf(model.config));
      expect(compressed.storage).toBe('compressed');
      const viaCore = run(model, compressed, prompt, 17);
      const viaRaw = run(model, raw, prompt, 17);
      expect(maxRelativeDifference(viaCore.prefill, viaRaw.prefill)).toBeLessThan(1e-4);
      expect(maxRelativeDifference(viaCore.decode, viaRaw.decode)).toBeLessThan(1e-4);
    });
  }

  it('one shared segment per cluster and slot; one segment per raw adapter; base rows untouched', async () => {
    const bank = handBank(model.config, { clusters: 2, perCluster: 3, rank: 3, seed: 6 });
    const shape = slotShapeOf(model.config);
    const adapters: (ResidentAdapter | null)[] = [
      await bankResident(bank, 'c1-0', model),
      residentFromLora('z-raw', randomLora(model.config, 3), shape),
      null,
      await bankResident(bank, 'c0-1', model),
      await bankResident(bank, 'c0-0', model),
      await bankResident(bank, 'c1-2', model),
      residentFromLora('a-raw', randomLora(model.config, 4), shape),
    ];
    const ordered = [...adapters].sort(compareAdapters);
    expect(ordered.map((a) => a?.id ?? 'base')).toEqual(['base', 'c0-0', 'c0-1', 'c1-0', 'c1-2', 'a-raw', 'z-raw']);
    const counts: BatchSegmentCounts = { rawSegments: 0, sharedSegments: 0, coreRows: 0 };
    const hook = new AdapterBatcher().hook(ordered, counts)!;
    const m = ordered.length;
    const slots = model.config.numLayers * 7;
    // q_proj of layer 0: in = out = 32
    const x = new Float32Array(m * 32).map((_, i) => Math.sin(i));
    const y = new Float32Array(m * 32).fill(0.5);
    for (let l = 0; l < model.config.numLayers; l++) {
      for (const module of ['q_proj', 'o_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj', 'down_proj'] as const) {
        const { inFeatures, outFeatures } = shape(l, module)!;
        const yy = module === 'q_proj' && l === 0 ? y : new Float32Array(m * outFeatures);
        const xx = module === 'q_proj' && l === 0 ? x : new Float32Array(m * inFeatures);
        const slot = hook(l, module, m);
        if (slot) kernels.loraApply(yy, outFeatures, xx, inFeatures, slot.segments, slot.cores);
      }
    }
    expect(counts.sharedSegments).toBe(2 * slots);
    expect(counts.rawSegments).toBe(2 * slots);
    expect(counts.coreRows).toBe(4 * slots);
    expect(Array.from(y.subarray(0, 32)).every((v) => v === 0.5)).toBe(true);
    expect(Array.from(y.subarray(32, 64)).some((v) => v !== 0.5)).toBe(true);
    expect(new AdapterBatcher().hook([null, null])).toBeNull();
  });

  it('reuses a slot plan while the rows are unchanged, and rebuilds it when any row changes', () => {
    const shape = slotShapeOf(model.config);
    const first = residentFromLora('first', randomLora(model.config, 31), shape);
    const second = residentFromLora('second', randomLora(model.config, 32), shape);
    const reloaded = residentFromLora('first', randomLora(model.config, 33), shape); // same id, new weights
    const batcher = new AdapterBatcher();
    const { inFeatures, outFeatures } = shape(0, 'q_proj')!;
    const step = (rows: (ResidentAdapter | null)[]): { segments: readonly unknown[]; y: Float32Array } => {
      const x = new Float32Array(rows.length * inFeatures).map((_, i) => Math.cos(i));
      const y = new Float32Array(rows.length * outFeatures);
      const slot = batcher.hook(rows)!(0, 'q_proj', rows.length)!;
      kernels.loraApply(y, outFeatures, x, inFeatures, slot.segments, slot.cores);
      return { segments: slot.segments, y };
    };
    const a = step([first, null, second]);
    const b = step([first, null, second]);
    expect(b.segments).toBe(a.segments); // same plan object: not rebuilt
    expect(Array.from(b.y)).toEqual(Array.from(a.y));
    const c = step([reloaded, null, second]); // a hot-reloaded adapter is a new object
    expect(c.segments).not.toBe(a.segments);
    expect(Array.from(c.y.subarray(0, outFeatures))).not.toEqual(Array.from(a.y.subarray(0, outFeatures)));
    expect(Array.from(c.y.subarray(2 * outFeatures))).toEqual(Array.from(a.y.subarray(2 * outFeatures)));
    const d = step([first, second]); // fewer rows
    expect(d.segments).not.toBe(c.segments);
    expect(batcher.hook([null])).toBeNull(); // an adapter-free step drops the remembered rows
    expect(step([first, second]).segments).not.toBe(d.segments);
  });

  it('carries its plans over (kernels.loraRows) when rows change and adapters stay or arrive, equal to plans built for the rows', async () => {
    const bank = handBank(model.config, { clusters: 2, perCluster: 3, rank: 3, seed: 8 });
    const shape = slotShapeOf(model.config);
    const keys = Array.from({ length: model.config.numLayers }, (_, l) => TARGET_MODULES.map((m) => slotKey(l, m))).flat();
    const bases = new Map<string, ResidentBases>();
    const adapters = [await bankResident(bank, 'c0-0', model, bases), await bankResident(bank, 'c0-1', model, bases),
      await bankResident(bank, 'c1-0', model, bases), residentFromLora('a-raw', randomLora(model.config, 5), shape)];
    const joining = await bankResident(bank, 'c1-2', model, bases);
    const fresh = residentFromLora('b-raw', randomLora(model.config, 6), shape);
    let carriedCalls = 0;
    const counting = { loraRows: (...args: Parameters<typeof kernels.loraRows>) => (carriedCalls++, kernels.loraRows(...args)) };
    const batcher = new AdapterBatcher(keys, counting);
    const rng = new Random(9);
    // runs every slot as the forward pass would (so the kernels keep each plan's checked form); per slot y
    const runStep = (hook: NonNullable<ReturnType<AdapterBatcher['hook']>>, m: number, seed: number): Float32Array[] =>
      keys.map((_, index) => {
        const l = Math.floor(index / TARGET_MODULES.length);
        const module = TARGET_MODULES[index % TARGET_MODULES.length]!;
        const { inFeatures, outFeatures } = shape(l, module)!;
        const x = new Float32Array(m * inFeatures).map((_, i) => Math.sin(seed + i));
        const y = new Float32Array(m * outFeatures);
        const slot = hook(l, module, m);
        if (slot) kernels.loraApply(y, outFeatures, x, inFeatures, slot.segments, slot.cores);
        return y;
      });
    const steps: { rows: (ResidentAdapter | null)[]; carried: boolean }[] = [
      { rows: [null, null, ...adapters.flatMap((a) => [a, a, a])], carried: false }, // prefill: three rows per request
      { rows: [null, ...adapters], carried: true }, // decode
      { rows: [adapters[0]!, adapters[2]!, adapters[3]!], carried: true }, // a request (and the base one) left
      { rows: [adapters[0]!, adapters[2]!, joining, adapters[3]!], carried: true }, // a new adapter joined (cluster 1's run)
      { rows: [null, adapters[0]!, joining, joining, fresh, adapters[3]!], carried: true }, // another, raw, and a request left
      { rows: [residentFromLora('z-new', randomLora(model.config, 7), shape)], carried: false }, // nothing in common
    ];
    for (const [index, { rows, carried }] of steps.entries()) {
      const before = carriedCalls;
      const m = rows.length;
      const hook = batcher.hook(rows)!;
      expect(carriedCalls > before, `step ${index} carried`).toBe(carried);
      const built = new AdapterBatcher(keys).hook(rows)!;
      for (let l = 0; l < model.config.numLayers; l++) {
        for (const module of TARGET_MODULES) expect(hook(l, module, m), `step ${index} ${l} ${module}`).toEqual(built(l, module, m));
      }
      const seed = rng.int(1000);
      expect(runStep(hook, m, seed)).toEqual(runStep(built, m, seed));
    }
  });

  it('given the model\'s slots, builds every plan of a new composition before the first slot is asked for', () => {
    const shape = slotShapeOf(model.config);
    const adapter = residentFromLora('eager', randomLora(model.config, 34), shape);
    const keys = Array.from({ length: model.config.numLayers }, (_, l) => TARGET_MODULES.map((m) => slotKey(l, m))).flat();
    const counts: BatchSegmentCounts = { rawSegments: 0, sharedSegments: 0, coreRows: 0 };
    const eager = new AdapterBatcher(keys).hook([adapter, null], counts)!;
    expect(counts.rawSegments).toBe(keys.length); // all built at hook time
    const lazyCounts: BatchSegmentCounts = { rawSegments: 0, sharedSegments: 0, coreRows: 0 };
    const lazy = new AdapterBatcher().hook([adapter, null], lazyCounts)!;
    expect(lazyCounts.rawSegments).toBe(0);
    for (let l = 0; l < model.config.numLayers; l++) {
      for (const module of TARGET_MODULES) expect(eager(l, module, 2)).toEqual(lazy(l, module, 2));
    }
    expect(counts.rawSegments).toBe(keys.length); // asking did not build them again
    expect(lazyCounts.rawSegments).toBe(keys.length);
  });
});
