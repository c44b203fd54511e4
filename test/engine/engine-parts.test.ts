import type { WeightDtype } from '../../src/tensor/dtype.js';
import { describe, expect, it } from 'vitest';
import { AdapterCache } from '../../src/engine/adapter-cache.js';
import { SoppuError } from '../../src/errors/soppu-error.js';
import type { BankReader } from '../../src/compress/bank-reader-types.js';
import { IncrementalDecoder, type EngineTokenizer } from '../../src/engine/engine-tokenizer.js';
import { StopWindow } from '../../src/engine/stop-window.js';
import { slotShapeOf } from '../../src/engine/engine.js';
import { KvBlockPool, kvBytesPerBlock } from '../../src/engine/kv-block-pool.js';
import { residentFromLora } from '../../src/engine/resident-adapter.js';
import { Sampler, resolveSampling } from '../../src/engine/sampler.js';
import { Scheduler, type ScheduledSequence } from '../../src/engine/scheduler.js';
import type { LoraAdapter } from '../../src/io/lora-types.js';
import { handBank, memoryLoader, randomLora, tinyConfig } from './helpers.js';

const shape = { layers: 2, kvHeads: 2, headDim: 4, blockSize: 4 };

describe('KvBlockPool', () => {
  it('sizes the pool from the byte budget and hands out and takes back blocks', () => {
    expect(kvBytesPerBlock(shape)).toBe(2 * 2 * 4 * 4 * 2 * 4);
    const pool = new KvBlockPool(shape, 10 * kvBytesPerBlock(shape) + 5);
    expect(pool.totalBlocks).toBe(10);
    expect(pool.storage.k[0]!.length).toBe(10 * 4 * 2 * 4);
    expect(pool.ensure(1, 9)).toBe(true); // 3 blocks
    expect(pool.table(1)).toHaveLength(3);
    expect(pool.ensure(1, 12)).toBe(true); // still 3
    expect(pool.ensure(2, 29)).toBe(false); // needs 8, 7 free: nothing allocated
    expect(pool.table(2)).toHaveLength(0);
    expect(pool.ensure(2, 28)).toBe(true);
    expect(pool.freeBlocks).toBe(0);
    expect(new Set([...pool.table(1), ...pool.table(2)]).size).toBe(10);
    pool.release(1);
    expect(pool.freeBlocks).toBe(3);
    expect(() => new KvBlockPool(shape, 10)).toThrow(/holds no block/);
  });
});

function seq(id: number, length: number, ready = true): ScheduledSequence {
  return { id, tokens: Array.from({ length }, (_, i) => i), computed: 0, preemptions: 0, ready: () => ready };
}

describe('Scheduler', () => {
  it('chunks long prompts under the batch-token budget and mixes decode rows in', () => {
    const pool = new KvBlockPool(shape, 100 * kvBytesPerBlock(shape));
    const scheduler = new Scheduler(pool, { maxBatchTokens: 8, maxRunningRequests: 4 });
    const long = seq(1, 20);
    scheduler.add(long);
    let step = scheduler.schedule();
    expect(step.map((e) => [e.seq.id, e.start, e.count, e.wantsNext])).toEqual([[1, 0, 8, false]]);
    scheduler.commit(step);
    const short = seq(2, 3);
    scheduler.add(short);
    step = scheduler.schedule();
    expect(step.map((e) => [e.seq.id, e.start, e.count])).toEqual([[1, 8, 8]]);
    scheduler.commit(step);
    step = scheduler.schedule();
    expect(step.map((e) => [e.seq.id, e.start, e.count, e.wantsNext])).toEqual([[1, 16, 4, true], [2, 0, 3, true]]);
    scheduler.commit(step);
    (long.tokens as number[]).push(99);
    (short.tokens as number[]).push(99);
    step = scheduler.schedule();
    expect(step.map((e) => [e.seq.id, e.start, e.count])).toEqual([[1, 20, 1], [2, 3, 1]]);
  });

  it('lets sequences whose adapter is loading wait without blocking others, and respects the running limit', () => {
    const pool = new KvBlockPool(shape, 100 * kvBytesPerBlock(shape));
    const scheduler = new Scheduler(pool, { maxBatchTokens: 64, maxRunningRequests: 2 });
    scheduler.add(seq(1, 3, false));
    scheduler.add(seq(2, 3));
    scheduler.add(seq(3, 3));
    scheduler.add(seq(4, 3));
    const step = scheduler.schedule();
    expect(step.map((e) => e.seq.id)).toEqual([2, 3]);
    expect(scheduler.waiting.map((s) => s.id)).toEqual([1, 4]);
  });

  it('preempts the youngest running sequence when decode runs out of blocks', () => {
    const pool = new KvBlockPool(shape, 4 * kvBytesPerBlock(shape));
    const scheduler = new Scheduler(pool, { maxBatchTokens: 64, maxRunningRequests: 4 });
    const old = seq(1, 4);
    const young = seq(2, 4);
    scheduler.add(old);
    scheduler.add(young);
    scheduler.commit(scheduler.schedule());
    expect(pool.freeBlocks).toBe(2);
    for (let t = 0; t < 5; t++) {
      (old.tokens as number[]).push(t);
      if (scheduler.running.includes(young as never)) (young.tokens as number[]).push(t);
      scheduler.commit(scheduler.schedule());
    }
    expect(young.preemptions).toBe(1);
    expect(young.computed).toBe(0);
    expect(scheduler.waiting).toContain(young);
    expect(old.computed).toBe(9);
    expect(pool.table(1)).toHaveLength(3);
  });
});

describe('Sampler', () => {
  const logits = (): Float32Array => Float32Array.from([1, 3, 2, 0.5, 2.9, -1]);

  it('greedy picks the argmax and reports log-softmax and alternatives', () => {
    const sampler = new Sampler(resolveSampling({}), 1);
    const result = sampler.sample(logits(), 2);
    expect(result.id).toBe(1);
    const z = Math.log([1, 3, 2, 0.5, 2.9, -1].reduce((s, v) => s + Math.exp(v), 0));
    expect(result.logprob).toBeCloseTo(3 - z, 5);
    expect(result.alternatives.map((a) => a.id)).toEqual([1, 4]);
  });

  it('penalties change the greedy choice', () => {
    const sampler = new Sampler(resolveSampling({ repetitionPenalty: 2 }), 1, [1]);
    expect(sampler.sample(logits()).id).toBe(4);
    const presence = new Sampler(resolveSampling({ presencePenalty: 1.5 }), 1);
    presence.observe(1);
    presence.observe(4);
    expect(presence.sample(logits()).id).toBe(2);
  });

  it('top-k, top-p and typical-p restrict the candidates; same seed, same draws', () => {
    const draws = (params: Parameters<typeof resolveSampling>[0], seed: number): number[] => {
      const sampler = new Sampler(resolveSampling(params), seed);
      return Array.from({ length: 200 }, () => sampler.sample(logits()).id);
    };
    expect(new Set(draws({ topK: 2, temperature: 5 }, 3))).toEqual(new Set([1, 4]));
    expect(new Set(draws({ topP: 0.5, temperature: 1 }, 3))).toEqual(new Set([1, 4]));
    expect(new Set(draws({ typicalP: 0.2, doSample: true }, 3)).size).toBeLessThan(6);
    expect(draws({ temperature: 2 }, 7)).toEqual(draws({ temperature: 2 }, 7));
    expect(draws({ temperature: 2 }, 7)).not.toEqual(draws({ temperature: 2 }, 8));
    // every bit of a seed up to 2^53 counts (the APIs take them): seed and seed + 2^32 draw differently
    expect(draws({ temperature: 2 }, 7 + 2 ** 32)).toEqual(draws({ temperature: 2 }, 7 + 2 ** 32));
    expect(draws({ temperature: 2 }, 7 + 2 ** 32)).not.toEqual(draws({ temperature: 2 }, 7));
    expect(draws({ temperature: 2 }, 2 ** 53 - 1)).not.toEqual(draws({ temperature: 2 }, 2 ** 32 - 1));
    expect(new Set(draws({ temperature: 3 }, 1)).size).toBe(6);
    expect(resolveSampling({ temperature: 0, topK: 5 }).sample).toBe(false);
    expect(() => resolveSampling({ topK: 1.5 })).toThrow(/top_k/);
  });
});

/** The bank with adapter `id` stripped of its slot at `path` (a member that keeps that slot out of the fit). */
function withoutSlot(reader: BankReader, id: string, path: string): BankReader {
  return {
    ...reader,
    async loadAdapter(adapterId) {
      const parts = await reader.loadAdapter(adapterId);
      if (adapterId !== id) return parts;
      const slots = new Map(parts.slots);
      slots.delete(path);
      return { ...parts, slots };
    },
  };
}

describe('AdapterCache', () => {
  const config = tinyConfig();
  const adapters = new Map<string, LoraAdapter>();
  for (let i = 0; i < 6; i++) adapters.set(`/a/${i}`, randomLora(config, i));
  const bytes = residentFromLora('x', adapters.get('/a/0')!, slotShapeOf(config)).bytes;
  const settle = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 5));

  function cache(
    budget: number,
    bank = handBank(config, { clusters: 1, perCluster: 3, rank: 2, seed: 1 }),
    dtypes: { factorDtype?: WeightDtype; bankFactorDtype?: WeightDtype; allocateBases?: (bytes: number) => ArrayBuffer } = {},
  ) {
    const c = new AdapterCache({ budgetBytes: budget, bank: bank.reader, loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config), ...dtypes });
    for (let i = 0; i < 6; i++) c.register(`l${i}`, { source: 'local', dir: `/a/${i}` });
    return { c, bank };
  }

  it('evicts least recently used adapters that no request holds and that are not pinned', async () => {
    const { c } = cache(2 * bytes);
    const e0 = c.acquire('l0');
    const e1 = c.acquire('l1');
    await settle();
    expect([e0.state, e1.state]).toEqual(['resident', 'resident']);
    c.release(e0);
    const e2 = c.acquire('l2');
    await settle();
    // l1 is held; l0 is the only candidate
    expect(e2.state).toBe('resident');
    expect(c.peek('l0')!.state).toBe('disk');
    expect(c.peek('l1')!.state).toBe('resident');
    expect(c.counts).toMatchObject({ misses: 3, loads: 3, evictions: 1 });
    c.release(e1);
    c.release(e2);
    c.pin('l2', true);
    c.release(c.acquire('l3'));
    await settle();
    c.release(c.acquire('l4'));
    await settle();
    expect(c.peek('l2')!.state).toBe('resident');
    expect(c.bytesResident).toBeLessThanOrEqual(2 * bytes);
    const again = c.acquire('l4');
    expect(c.counts.hits).toBe(1);
    c.release(again);
  });

  it('a held adapter waits for room instead of exceeding the budget with everything held', async () => {
    const { c } = cache(bytes);
    const e0 = c.acquire('l0');
    await settle();
    const e1 = c.acquire('l1');
    await settle();
    expect(e1.state).toBe('disk');
    c.release(e0);
    await settle();
    expect(e1.state).toBe('resident');
    expect(c.peek('l0')!.state).toBe('disk');
  });

  it('a held adapter is not starved: pinned adapters in use free nothing, and steady traffic is outwaited (maxLoadWaitMs)', async () => {
    const pinnedCase = cache(Math.round(bytes * 1.5)).c;
    pinnedCase.pin('l0', true);
    const busy = pinnedCase.acquire('l0');
    await settle();
    const waiting = pinnedCase.acquire('l1');
    await settle();
    expect(waiting.state).toBe('resident'); // releasing l0 would free nothing: waiting for it was forever
    pinnedCase.release(busy);
    pinnedCase.release(waiting);

    const c = new AdapterCache({ budgetBytes: Math.round(bytes * 1.5), bank: null, loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config), maxLoadWaitMs: 30 });
    for (let i = 0; i < 2; i++) c.register(`l${i}`, { source: 'local', dir: `/a/${i}` });
    let held = c.acquire('l0');
    await settle();
    const starved = c.acquire('l1');
    await settle();
    expect(starved.state).toBe('disk'); // waits for room while l0 is in use ...
    // ... which steady traffic never gives: a new request takes l0 before the last one lets it go
    for (let i = 0; i < 10 && starved.state !== 'resident'; i++) {
      const next = c.acquire('l0');
      c.release(held);
      held = next;
      await new Promise((resolve) => setTimeout(resolve, 10));
      await settle();
    }
    expect(starved.state).toBe('resident');
    c.release(held);
    c.release(starved);
  });

  it('a wait for room ends by itself (a timer), and a request that stopped waiting leaves no head start behind', async () => {
    const make = () => {
      const c = new AdapterCache({ budgetBytes: Math.round(bytes * 1.5), bank: null, loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config), maxLoadWaitMs: 60 });
      for (let i = 0; i < 2; i++) c.register(`l${i}`, { source: 'local', dir: `/a/${i}` });
      return c;
    };
    // one long request holds l0, nothing else happens: l1 still loads once it has waited
    const quiet = make();
    const long = quiet.acquire('l0');
    await settle();
    const blocked = quiet.acquire('l1');
    await settle();
    expect(blocked.state).toBe('disk');
    await new Promise((resolve) => setTimeout(resolve, 150));
    await settle();
    expect(blocked.state).toBe('resident');
    quiet.release(long);
    quiet.release(blocked);
    // a request that gave up waiting (cancelled): a later one waits afresh instead of loading over the budget
    const c = make();
    const held = c.acquire('l0');
    await settle();
    const gaveUp = c.acquire('l1');
    await settle();
    c.release(gaveUp);
    await new Promise((resolve) => setTimeout(resolve, 100));
    const later = c.acquire('l1');
    await settle();
    expect(later.state).toBe('disk');
    expect(c.bytesResident).toBeLessThanOrEqual(Math.round(bytes * 1.5));
    c.release(held);
    await settle();
    expect(later.state).toBe('resident');
    c.release(later);
  });

  it('counts each shared base once: an in-flight load\'s bases (held before its adapter is) and two loads of one cluster', async () => {
    const bank = handBank(config, { clusters: 5, perCluster: 2, rank: 6, seed: 3 });
    const probe = cache(1 << 30, bank).c;
    probe.acquire('c0-0');
    await settle();
    const one = probe.bytesResident;
    for (let ticks = 0; ticks <= 16; ticks += 4) {
      const { c } = cache(Math.round(one * 1.5), bank);
      const warm = c.acquire('c4-0'); // a known size, then unheld (evictable)
      await settle();
      c.release(warm);
      const first = c.acquire('c0-0');
      for (let i = 0; i < ticks; i++) await new Promise((resolve) => setImmediate(resolve));
      const second = c.acquire('c1-0'); // another cluster: no room beside the first one's bases
      await settle();
      await settle();
      expect(c.bytesResident, `after ${ticks} ticks`).toBeLessThanOrEqual(Math.round(one * 1.5));
      expect(second.state, `after ${ticks} ticks`).toBe('disk');
      c.release(first);
      c.release(second);
    }
    // two adapters of one cluster share its bases: both fit, so the second does not wait for the first
    const { c } = cache(Math.round(one * 1.2), bank);
    const warm = c.acquire('c4-0'); // a known size (a cold start loads one at a time), then unheld
    await settle();
    c.release(warm);
    const a = c.acquire('c0-0');
    const b = c.acquire('c0-1');
    expect([a.state, b.state]).toEqual(['loading', 'loading']);
    await settle();
    await settle();
    expect([a.state, b.state]).toEqual(['resident', 'resident']);
  });

  it('forgets an evicted folder a request named (@local:): the next request naming it registers it again', async () => {
    const { c } = cache(Math.round(bytes * 1.5));
    const ids = [0, 1, 2].map((i) => `@local:/a/${i}`);
    for (const [i, id] of ids.entries()) {
      c.register(id, { source: 'local', dir: `/a/${i}` });
      const entry = c.acquire(id);
      await settle();
      expect(entry.state).toBe('resident');
      c.release(entry);
    }
    // the budget holds one: the first two were evicted and are no longer listed
    expect(c.ids().filter((id) => id.startsWith('@local:'))).toEqual([ids[2]]);
    expect(c.peek(ids[0]!)).toBeUndefined();
    expect(c.peek('l0')).toBeDefined(); // registered ids stay
    // nor do folders that failed to load, or that a request stopped waiting for
    for (let i = 0; i < 5; i++) {
      c.register(`@local:/missing/${i}`, { source: 'local', dir: `/missing/${i}` });
      const failed = c.acquire(`@local:/missing/${i}`);
      await settle();
      expect(failed.state).toBe('failed');
      c.release(failed);
    }
    const holder = c.acquire(ids[2]!);
    c.register('@local:/a/4', { source: 'local', dir: '/a/4' });
    const gaveUp = c.acquire('@local:/a/4');
    await settle();
    expect(gaveUp.state).toBe('disk'); // no room beside the held one
    c.release(gaveUp);
    expect(c.ids().filter((id) => id.startsWith('@local:'))).toEqual([ids[2]]);
    c.release(holder);
  });

  it('an unpin leaves no head start; cold bank loads whose bases the bank tells start together', async () => {
    const c = new AdapterCache({ budgetBytes: Math.round(bytes * 1.5), bank: null, loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config), maxLoadWaitMs: 60 });
    for (let i = 0; i < 2; i++) c.register(`l${i}`, { source: 'local', dir: `/a/${i}` });
    const held = c.acquire('l0');
    await settle();
    c.pin('l1', true); // no room: held back
    await settle();
    c.pin('l1', false);
    await new Promise((resolve) => setTimeout(resolve, 100));
    const later = c.acquire('l1');
    await settle();
    expect(later.state).toBe('disk'); // it waits afresh, not over the budget at once
    c.release(held);
    c.release(later);
    const bank = handBank(config, { clusters: 4, perCluster: 1, rank: 2, seed: 2 });
    const cold = cache(1 << 30, bank).c;
    const loads = ['c0-0', 'c1-0', 'c2-0', 'c3-0'].map((id) => cold.acquire(id));
    expect(loads.map((e) => e.state)).toEqual(['loading', 'loading', 'loading', 'loading']);
  });

  it.each([
    ['f32 throughout', {}],
    ['a bf16 bank beside f32 PEFT adapters', { factorDtype: 'f32', bankFactorDtype: 'bf16' }],
  ] as const)('counts the shared bases a load brings against the budget, at the bank dtype’s size: %s', async (_, dtypes) => {
    const bank = handBank(config, { clusters: 5, perCluster: 2, rank: 6, seed: 3 });
    const probe = cache(1 << 30, bank, dtypes).c;
    probe.acquire('c0-0');
    await settle();
    const one = probe.bytesResident; // one adapter and its cluster's bases
    // room for two: a second cluster loads beside a held one (bf16 bases sized as f32 made room for none)
    const roomy = cache(Math.round(one * 2.2), bank, dtypes).c;
    roomy.acquire('c0-0');
    await settle();
    const second = roomy.acquire('c1-0');
    await settle();
    await settle();
    expect(second.state).toBe('resident');
    // room for one and a half: other clusters wait instead of piling up
    const { c } = cache(Math.round(one * 1.5), bank, dtypes);
    const held = [c.acquire('c0-0')];
    await settle();
    for (const id of ['c1-0', 'c2-0', 'c3-0', 'c4-0']) held.push(c.acquire(id));
    await settle();
    await settle();
    expect(c.bytesResident).toBeLessThanOrEqual(Math.round(one * 1.5));
    expect(held.slice(1).map((e) => e.state)).toEqual(['disk', 'disk', 'disk', 'disk']);
    // each release makes room for the next one
    for (let i = 0; i < 4; i++) {
      c.release(held[i]!);
      await settle();
      await settle();
      expect(held[i + 1]!.state, held[i + 1]!.id).toBe('resident');
      expect(c.bytesResident).toBeLessThanOrEqual(Math.round(one * 1.5));
    }
  });

  it('holds a bank’s adapters and bases in bankFactorDtype, PEFT adapters in factorDtype', async () => {
    const bytesOf = async (dtypes: { factorDtype?: WeightDtype; bankFactorDtype?: WeightDtype }) => {
      const { c } = cache(1 << 30, undefined, dtypes);
      const bankEntry = c.acquire('c0-0');
      const local = c.acquire('l0');
      await settle();
      await settle();
      return { bank: bankEntry.resident!.bytes, bases: c.bytesResident - bankEntry.resident!.bytes - local.resident!.bytes, local: local.resident!.bytes };
    };
    const full = await bytesOf({});
    const split = await bytesOf({ factorDtype: 'f32', bankFactorDtype: 'bf16' });
    expect(split).toEqual({ bank: full.bank / 2, bases: full.bases / 2, local: full.local });
    expect(await bytesOf({ factorDtype: 'bf16' })).toEqual({ bank: full.bank / 2, bases: full.bases / 2, local: full.local / 2 });
  });

  it('shares a cluster’s bases between its adapters and frees them with the last one', async () => {
    const { c, bank } = cache(1 << 30);
    const held = ['c0-0', 'c0-1', 'c0-2'].map((id) => c.acquire(id));
    await settle();
    await settle();
    expect(held.every((e) => e.state === 'resident')).toBe(true);
    expect(bank.calls.bases).toBe(config.numLayers * 7);
    const basesBytes = c.bytesResident - held.reduce((n, e) => n + e.resident!.bytes, 0);
    expect(basesBytes).toBeGreaterThan(0);
    for (const e of held) c.release(e);
    for (const id of ['c0-0', 'c0-1', 'c0-2']) c.remove(id);
    expect(c.bytesResident).toBe(0);
  });

  it('with allocateBases, the bases one load brings in share one buffer: each factor at a 64-byte boundary, the same values', async () => {
    const buffers: ArrayBuffer[] = [];
    const allocateBases = (n: number): ArrayBuffer => {
      const buffer = new ArrayBuffer(n);
      buffers.push(buffer);
      return buffer;
    };
    const grouped = cache(1 << 30, undefined, { allocateBases }).c;
    const apart = cache(1 << 30).c;
    const [held, twin] = [grouped.acquire('c0-0'), apart.acquire('c0-0')];
    const sibling = grouped.acquire('c0-1');
    await settle();
    await settle();
    expect([held.state, twin.state, sibling.state]).toEqual(['resident', 'resident', 'resident']);
    // one buffer for the cluster's bases: the sibling's load found them loading or held
    expect(buffers).toHaveLength(1);
    let compressed = 0;
    for (const [key, slot] of held.resident!.slots) {
      if (slot.kind !== 'compressed') continue;
      compressed++;
      const other = twin.resident!.slots.get(key);
      if (other?.kind !== 'compressed') throw new Error(`slot ${key} is not compressed in the ungrouped cache`);
      for (const factor of ['a', 'bt'] as const) {
        const data = slot.bases[factor].data;
        expect(data.buffer, `${key} ${factor}`).toBe(buffers[0]);
        expect(data.byteOffset % 64, `${key} ${factor}`).toBe(0);
        expect(Array.from(data), `${key} ${factor}`).toEqual(Array.from(other.bases[factor].data));
      }
      expect(sibling.resident!.slots.get(key)).toMatchObject({ bases: slot.bases });
    }
    expect(compressed).toBe(config.numLayers * 7);
    expect(grouped.bytesResident).toBe(apart.bytesResident + sibling.resident!.bytes);
  });

  it('with allocateBases, a shared buffer counts whole while any of its keys is held', async () => {
    const bank = handBank(config, { clusters: 1, perCluster: 3, rank: 2, seed: 1 });
    const buffers: ArrayBuffer[] = [];
    const c = new AdapterCache({
      budgetBytes: 1 << 30, bank: withoutSlot(bank.reader, 'c0-1', 'model.layers.0.self_attn.q_proj'), loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config),
      allocateBases: (n) => (buffers.push(new ArrayBuffer(n)), buffers[buffers.length - 1]!),
    });
    const whole = c.acquire('c0-0');
    await settle();
    await settle();
    expect(buffers).toHaveLength(1);
    expect(c.bytesResident).toBe(whole.resident!.bytes + buffers[0]!.byteLength);
    const partial = c.acquire('c0-1');
    await settle();
    expect(partial.state).toBe('resident');
    // c0-0 goes; c0-1 still holds every key but one, and with them the whole buffer
    c.release(whole);
    c.remove('c0-0');
    expect(c.bytesResident).toBe(partial.resident!.bytes + buffers[0]!.byteLength);
    c.release(partial);
    c.remove('c0-1');
    expect(c.bytesResident).toBe(0);
  });

  it('with allocateBases, one bad bases file fails its own key only, and a retry reads the cluster again into one buffer', async () => {
    const bank = handBank(config, { clusters: 1, perCluster: 3, rank: 2, seed: 1 });
    const badKey = 'c0/model.layers.1.mlp.up_proj';
    let broken = true;
    const reader = {
      ...withoutSlot(bank.reader, 'c0-1', 'model.layers.1.mlp.up_proj'),
      loadBases: async (key: string) => {
        const bases = await bank.reader.loadBases(key);
        if (broken && key === badKey) throw new SoppuError('BANK_CORRUPT', `bases ${key}: checksum mismatch`);
        return bases;
      },
    };
    const buffers: ArrayBuffer[] = [];
    const c = new AdapterCache({
      budgetBytes: 1 << 30, bank: reader, loadLocal: memoryLoader(adapters), slotShape: slotShapeOf(config),
      allocateBases: (n) => (buffers.push(new ArrayBuffer(n)), buffers[buffers.length - 1]!),
    });
    const first = c.acquire('c0-0');
    // a member of the cluster that does not use the bad key, loading at the same time, is not touched by it
    const unaffected = c.acquire('c0-1');
    await settle();
    await settle();
    expect(first.state).toBe('failed');
    expect(first.error?.message).toMatch(/bases c0\/model\.layers\.1\.mlp\.up_proj: checksum mismatch/);
    expect(unaffected.state).toBe('resident');
    expect(buffers).toHaveLength(0);
    c.release(first);
    c.release(unaffected);
    c.remove('c0-1');
    expect(c.bytesResident).toBe(0);
    expect(bank.calls.bases).toBe(config.numLayers * 7);
    broken = false;
    const retry = c.acquire('c0-0');
    await settle();
    await settle();
    expect(retry.state).toBe('resident');
    // every key read again (none kept, unaccounted, from the failed load), into one buffer
    expect(bank.calls.bases).toBe(2 * config.numLayers * 7);
    expect(buffers).toHaveLength(1);
    for (const slot of retry.resident!.slots.values()) if (slot.kind === 'compressed') expect(slot.bases.a.data.buffer).toBe(buffers[0]);
    const basesBytes = [...new Set([...retry.resident!.slots.values()].flatMap((slot) => (slot.kind === 'compressed' ? [slot.bases] : [])))].reduce((n, b) => n + b.bytes, 0);
    expect(c.bytesResident).toBe(retry.resident!.bytes + basesBytes);
  });

  it('hot reload: re-registering an id serves the new directory, the old copy is freed after its last user', async () => {
    const { c } = cache(1 << 30);
    const old = c.acquire('l0');
    await settle();
    c.register('l0', { source: 'local', dir: '/a/5' });
    const fresh = c.acquire('l0');
    await settle();
    expect(fresh).not.toBe(old);
    expect(fresh.resident!.slots.get('0.q_proj')).not.toEqual(old.resident!.slots.get('0.q_proj'));
    const before = c.bytesResident;
    c.release(old);
    expect(c.bytesResident).toBe(before - old.knownBytes);
    c.release(fresh);
    expect(() => c.acquire('unknown')).toThrow(/not in the bank/);
  });

  it('a load abandoned while it runs (released, then removed) still frees its slot: the load waiting for it starts', async () => {
    let openGate: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => (openGate = resolve));
    const loadLocal = async (dir: string): Promise<LoraAdapter> => {
      if (dir === '/a/0') await gate;
      return memoryLoader(adapters)(dir);
    };
    const c = new AdapterCache({ budgetBytes: 1 << 30, bank: null, loadLocal, slotShape: slotShapeOf(config), maxConcurrentLoads: 1 });
    c.register('l0', { source: 'local', dir: '/a/0' });
    c.register('l1', { source: 'local', dir: '/a/1' });
    const first = c.acquire('l0');
    const second = c.acquire('l1');
    await settle();
    expect([first.state, second.state]).toEqual(['loading', 'disk']); // one load at a time
    c.release(first); // its request went away
    c.remove('l0');
    openGate();
    await settle();
    await settle();
    expect(second.state).toBe('resident'); // before the fix it stayed on disk until some unrelated cache call
    expect(first.state).toBe('disk');
    expect(c.bytesResident).toBe(second.resident!.bytes);
    c.release(second);
  });

  it('on a cold start (no size known yet) loads one adapter at a time, so a burst stays within the budget', async () => {
    const { c } = cache(bytes + bytes / 2); // room for one adapter
    const held = [0, 1, 2, 3].map((i) => c.acquire(`l${i}`));
    expect(held.filter((e) => e.state === 'loading')).toHaveLength(1); // before: all four, each estimated at 0 bytes
    let peak = 0;
    for (let round = 0; round < 8 && held.some((e) => e.state !== 'resident'); round++) {
      await settle();
      peak = Math.max(peak, c.bytesResident);
      const done = held.find((e) => e.state === 'resident');
      if (done) {
        c.release(done);
        held.splice(held.indexOf(done), 1);
      }
    }
    expect(held).toHaveLength(0);
    expect(peak).toBeLessThanOrEqual(bytes + bytes / 2);
  });
});

describe('Scheduler deadlock', () => {
  it('running prefills that block each other: the youngest is preempted so the oldest proceeds', () => {
    const pool = new KvBlockPool(shape, 6 * kvBytesPerBlock(shape));
    const scheduler = new Scheduler(pool, { maxBatchTokens: 4, maxRunningRequests: 4 });
    const first = seq(1, 16);
    const second = seq(2, 16);
    scheduler.add(first);
    scheduler.commit(scheduler.schedule()); // first: 4 of 16, 1 block
    scheduler.add(second);
    // second cannot be admitted while first's whole prompt does not leave room
    for (let i = 0; i < 3; i++) scheduler.commit(scheduler.schedule());
    expect(first.computed).toBe(16);
    // force a state where both hold blocks and neither can grow
    const a = seq(3, 12);
    const b = seq(4, 12);
    const tight = new KvBlockPool(shape, 4 * kvBytesPerBlock(shape));
    const s2 = new Scheduler(tight, { maxBatchTokens: 4, maxRunningRequests: 4 });
    s2.add(a);
    s2.add(b);
    tight.ensure(3, 8);
    tight.ensure(4, 8);
    a.computed = 8;
    b.computed = 8;
    s2.running.push(...s2.waiting.splice(0));
    const step = s2.schedule();
    expect(step.map((e) => e.seq.id)).toEqual([3]);
    expect(b.preemptions).toBe(1);
  });
});

describe('IncrementalDecoder', () => {
  // a SentencePiece-like decoder: ▁ is a space, <0xNN> a byte, and one leading space of the text is stripped
  const PIECES = ['<s>', '▁The', '▁capital', '▁is', '▁Paris', '.', '<0xC3>', '<0xA9>'];
  const sentencePiece: EngineTokenizer = {
    encode: () => [],
    tokenizeWithOffsets: () => [],
    decode(ids, skipSpecialTokens) {
      const bytes: number[] = [];
      for (const id of ids) {
        const piece = PIECES[id]!;
        if (id === 0 && skipSpecialTokens) continue;
        const byte = /^<0x([0-9A-F]{2})>$/.exec(piece);
        bytes.push(...(byte ? [parseInt(byte[1]!, 16)] : Buffer.from(piece.replaceAll('▁', ' '), 'utf8')));
      }
      return Buffer.from(bytes).toString('utf8').replace(/^ /, '');
    },
    isSpecial: (id) => id === 0,
    applyChatTemplate: () => '',
  };

  it("keeps the leading space of the first generated word after the prompt's last tokens", () => {
    const decoder = new IncrementalDecoder(sentencePiece, [0, 1, 2, 3]);
    expect([decoder.push(4), decoder.push(5), decoder.flush()]).toEqual([' Paris', '.', '']);
    // a prompt of only <s>: the text starts with the word, as a full decode has it
    const fresh = new IncrementalDecoder(sentencePiece, [0]);
    expect(fresh.push(4)).toBe('Paris');
  });

  it('holds back a split character, and ignores a context that ends inside one', () => {
    const decoder = new IncrementalDecoder(sentencePiece, [1]);
    expect([decoder.push(6), decoder.push(7)]).toEqual(['', 'é']);
    const split = new IncrementalDecoder(sentencePiece, [1, 6]);
    expect(split.push(4)).toBe('Paris'); // not decoded after a U+FFFD, which would shift it
  });
});

describe('StopWindow', () => {
  it('tells the token a matched stop starts in', () => {
    const tokens: [string, string | null][] = [['ab', null], ['c', null], ['', '</s>'], ['W', null], ['x', null]];
    const startOf = (stop: string): number | null => {
      const window = new StopWindow([stop]);
      for (const [piece, special] of tokens) if (window.push(piece, special) !== null) return window.stopToken;
      return null;
    };
    expect(startOf('</s>W')).toBe(2);
    expect(startOf('c</s>')).toBe(1);
    expect(startOf('bc')).toBe(0);
    expect(startOf('Wx')).toBe(3);
    expect(startOf('zz')).toBeNull();
  });

  it('cuts at a stop across pieces, however long the text before it', () => {
    const window = new StopWindow(['lo w', 'zz']);
    let text = '';
    for (let i = 0; i < 100; i++) {
      expect(window.push('ab', null)).toBeNull();
      text += 'ab';
    }
    expect(window.push('hel', null)).toBeNull();
    expect(window.push('lo', null)).toBeNull();
    text += 'hello';
    expect(window.push(' world', null)).toBe(text.length - 2);
  });

  it("matches special tokens' text as LoRAX/TGI do: a stop may start, end or lie in one, or span two", () => {
    const run = (stops: string[], tokens: [string, string | null][]): number | null => {
      const window = new StopWindow(stops);
      for (const [piece, special] of tokens) {
        const cut = window.push(piece, special);
        if (cut !== null) return cut;
      }
      return null;
    };
    const one: [string, string | null][] = [['abc', null], ['', '</s>'], ['W', null], ['xyz', null]];
    const two: [string, string | null][] = [['abc', null], ['', '</s>'], ['', '<s>'], ['W', null], ['xyz', null]];
    expect(run(['</s>'], two)).toBe(3);
    expect(run(['</s>W'], one)).toBe(3); // starts in the special token
    expect(run(['</s>W'], two)).toBeNull(); // <s> stands between
    expect(run(['c</s>'], two)).toBe(2); // ends in it
    expect(run(['</s><s>'], two)).toBe(3); // two of them
    expect(run(['/s>'], two)).toBe(3); // starts inside one: cut where it stands
    expect(run(['s><s>W'], two)).toBe(3);
    expect(run(['cW'], one)).toBeNull(); // the special token stands between: no match, as in TGI's text
    expect(run(['Wxy', 'bc</s>'], one)).toBe(1); // the earliest stop
    expect(run(['Wxy'], one)).toBe(3);
  });
});
