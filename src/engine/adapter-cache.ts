/**
 * Resident adapters within a byte budget. Adapters load asynchronously (from a bank: the adapter's
 * own parts plus its cluster's shared bases, which are refcounted and shared; or from a PEFT
 * directory), so the running batch never waits: a request waits only for its own adapter. Eviction
 * is least-recently-used among adapters that no request holds and that are not pinned. A load
 * failure fails only the requests holding that adapter. Re-registering an id (hot reload) swaps in a
 * fresh entry; requests already holding the old one finish with it.
 */
import { SoppuError, isSoppuError } from '../errors/soppu-error.js';
import type { BankReader } from '../compress/bank-reader-types.js';
import { LOCAL_ADAPTER_PREFIX } from '../compress/bank-manifest.js';
import type { LoraAdapter } from '../io/lora-types.js';
import { residentBases, residentBasesInOneBuffer, residentFromBank, residentFromLora, type ResidentAdapter, type ResidentBases, type SlotShape } from './resident-adapter.js';
import { WEIGHT_DTYPE_BYTES, type WeightDtype } from '../tensor/dtype.js';

export type AdapterSpec = { readonly source: 'bank' } | { readonly source: 'local'; readonly dir: string };

export interface AdapterCacheOptions {
  readonly budgetBytes: number;
  readonly bank: BankReader | null;
  /** Loads a PEFT directory (the io loader). */
  readonly loadLocal: (dir: string) => Promise<LoraAdapter>;
  readonly slotShape: SlotShape;
  /** dtype of resident PEFT-directory adapters' factors (default f32). */
  readonly factorDtype?: WeightDtype;
  /** dtype of resident bank adapters: shared bases, cores and raw factors (default factorDtype). */
  readonly bankFactorDtype?: WeightDtype;
  /**
   * Memory for the shared bases one adapter load brings in (its cluster's, in one buffer; the engine passes the
   * addon's huge-page buffer). Default: each factor its own array.
   */
  readonly allocateBases?: (bytes: number) => ArrayBuffer;
  /** Loads in flight at once (default 4). */
  readonly maxConcurrentLoads?: number;
  /** Called when a load finishes or fails, so the engine can schedule waiting requests. */
  readonly onSettled?: () => void;
  /**
   * How long a held adapter waits for room before it loads over the budget anyway (default 2000 ms): under
   * steady traffic the adapters in use never all come free at once, so the room it waits for may never come.
   */
  readonly maxLoadWaitMs?: number;
}

export type EntryState = 'disk' | 'loading' | 'resident' | 'failed';

/** One adapter id's cache entry. Requests hold the entry object itself (hot reload swaps it). */
export class AdapterEntry {
  readonly id: string;
  readonly spec: AdapterSpec;
  state: EntryState = 'disk';
  resident: ResidentAdapter | null = null;
  error: SoppuError | null = null;
  users = 0;
  pinned = false;
  lastUse = 0;
  /** Bytes when last resident (an estimate for planning the next load). */
  knownBytes = 0;
  /** When a load of it was first held back for room (performance.now()), 0 when not waiting. */
  waitingSince = 0;
  /** Replaced by a re-registration or removed: freed when its last user releases it. */
  stale = false;
  /** Called once when the entry is dropped (stale and unheld): nothing reads its source again. */
  onDrop: (() => void) | undefined;
  /**
   * A bank entry's bank as it was when the entry was made: a request that holds it loads this
   * version even after the bank changed (the id removed, or replaced), as it would had it loaded first.
   */
  bank: BankReader | null;

  constructor(id: string, spec: AdapterSpec, onDrop?: () => void, bank: BankReader | null = null) {
    this.id = id;
    this.spec = spec;
    this.onDrop = onDrop;
    this.bank = spec.source === 'bank' ? bank : null;
  }
}

/**
 * What holding (+1) or letting go of (−1) one key's bases changes in the bytes resident: its own bytes, or for bases
 * in a shared buffer, the whole buffer when the first of its keys is held and when the last is let go (the buffer
 * lives while any of them does).
 */
function heldBytesOf(bases: ResidentBases, change: 1 | -1): number {
  const group = bases.group;
  if (!group) return bases.bytes;
  const before = group.held;
  group.held += change;
  return before === 0 || group.held === 0 ? group.bytes : 0;
}

export interface AdapterCacheCounts {
  hits: number;
  misses: number;
  loads: number;
  evictions: number;
}

export class AdapterCache {
  readonly counts: AdapterCacheCounts = { hits: 0, misses: 0, loads: 0, evictions: 0 };
  private options: AdapterCacheOptions;
  private readonly entries = new Map<string, AdapterEntry>();
  /** Stale entries still held by requests: they load, count and free like the others. */
  private readonly staleHeld = new Set<AdapterEntry>();
  private readonly bases = new Map<string, { bases: ResidentBases; refs: number }>();
  private readonly basesLoading = new Map<string, Promise<ResidentBases>>();
  private loading = 0;
  private clock = 0;
  private adapterBytes = 0;
  private basesBytes = 0;

  constructor(options: AdapterCacheOptions) {
    if (!(options.budgetBytes >= 0)) {
      throw new SoppuError('CONFIG', `adapter cache budget must be >= 0 bytes, got ${options.budgetBytes}`, { field: 'adapterBudgetBytes', limit: '>= 0' });
    }
    this.options = options;
  }

  get budgetBytes(): number {
    return this.options.budgetBytes;
  }

  private get bankDtype(): WeightDtype {
    return this.options.bankFactorDtype ?? this.options.factorDtype ?? 'f32';
  }

  /** Bytes of resident adapter parts plus shared bases. */
  get bytesResident(): number {
    return this.adapterBytes + this.basesBytes;
  }

  /**
   * Swaps in a reopened bank (after an adapter was added to it, or a refit). An adapter whose weights the new
   * version changed or dropped (its fingerprint) goes stale, as a re-registration does; the others' cached parts
   * stay valid. A bank entry that no request holds reads the new bank from now on; one that requests hold keeps
   * the bank they were admitted with until it loads.
   */
  setBank(bank: BankReader | null): void {
    this.options = { ...this.options, bank };
    for (const entry of [...this.entries.values()]) {
      if (entry.spec.source !== 'bank') continue;
      // an adapter the new version changed or dropped (a refit, bank rm): its copy goes stale, and requests
      // holding it finish with it; the next request loads the new version (a pin carries over)
      const before = entry.bank?.fingerprint?.(entry.id);
      const after = bank?.fingerprint?.(entry.id) ?? null;
      if (before !== undefined && before !== after) {
        const pinned = entry.pinned;
        this.invalidate(entry.id);
        if (pinned && after !== null) this.register(entry.id, { source: 'bank' }).pinned = true;
        continue;
      }
      if (entry.users === 0 && entry.state !== 'loading') entry.bank = bank;
    }
    this.pump();
  }

  /**
   * Bank readers older than the open one that requests still need: held entries made before a bank change
   * that have not loaded yet (the next change must not delete their files).
   */
  readersStillNeeded(): BankReader[] {
    const readers = new Set<BankReader>();
    for (const entry of [...this.entries.values(), ...this.staleHeld]) {
      // held and not loaded yet, or loading now (a pinned adapter's load holds no request)
      if (entry.bank && entry.bank !== this.options.bank && ((entry.users > 0 && entry.state !== 'resident') || entry.state === 'loading')) readers.add(entry.bank);
    }
    return [...readers];
  }

  /** True when `id` is registered locally or held by the bank. */
  has(id: string): boolean {
    return this.entries.has(id) || (this.options.bank?.has(id) ?? false);
  }

  /** The entry for `id` if one exists now (no load, no counting). */
  peek(id: string): AdapterEntry | undefined {
    return this.entries.get(id);
  }

  /** Every id known: registered entries and bank ids. */
  ids(): string[] {
    const ids = new Set(this.entries.keys());
    for (const id of this.options.bank?.ids() ?? []) ids.add(id);
    return [...ids].sort();
  }

  /**
   * Registers (or replaces: hot reload) `id`. The old entry's cached copy is invalidated. `onDrop` is called
   * once this registration is removed or replaced and no request holds it.
   */
  register(id: string, spec: AdapterSpec, onDrop?: () => void): AdapterEntry {
    this.invalidate(id);
    const entry = new AdapterEntry(id, spec, onDrop, this.options.bank);
    this.entries.set(id, entry);
    return entry;
  }

  /** Forgets `id`; requests already holding it finish with their copy. */
  remove(id: string): boolean {
    const existed = this.entries.has(id);
    this.invalidate(id);
    return existed;
  }

  pin(id: string, pinned: boolean): AdapterEntry {
    const entry = this.entryFor(id);
    entry.pinned = pinned;
    if (!pinned && entry.users === 0) entry.waitingSince = 0; // nobody waits for it any more
    if (!pinned) this.evictToFit();
    this.pump(); // a pin may start a load; an unpin may have freed room for one
    return entry;
  }

  /**
   * A request takes hold of `id`'s entry (loading it when there is room). Throws ADAPTER_NOT_FOUND.
   * The caller must `release` it exactly once.
   */
  acquire(id: string): AdapterEntry {
    const entry = this.entryFor(id);
    entry.users++;
    entry.lastUse = ++this.clock;
    if (entry.state === 'resident') this.counts.hits++;
    else this.counts.misses++;
    if (entry.state === 'failed') {
      // a new request retries: the file may have been fixed
      entry.state = 'disk';
      entry.error = null;
    }
    this.pump();
    return entry;
  }

  release(entry: AdapterEntry): void {
    if (entry.users <= 0) throw new SoppuError('INTERNAL', `adapter ${entry.id} released more often than acquired`);
    entry.users--;
    entry.lastUse = ++this.clock;
    if (entry.users === 0 && !entry.pinned) {
      entry.waitingSince = 0; // nobody waits for it any more
      this.forgetLocal(entry);
    }
    if (entry.users === 0 && entry.stale) this.drop(entry);
    else this.evictToFit();
    this.pump();
  }

  /**
   * Starts loads for held entries still on disk, oldest first, while the budget has room that no
   * request and no pin holds.
   */
  pump(): void {
    const max = this.options.maxConcurrentLoads ?? 4;
    if (this.loading >= max) return;
    const waiting = [...this.entries.values(), ...this.staleHeld]
      .filter((e) => e.state === 'disk' && (e.users > 0 || e.pinned))
      .sort((p, q) => p.lastUse - q.lastUse);
    for (const entry of waiting) {
      if (this.loading >= max) return;
      // when nothing is loading and no request holds a resident adapter (one whose release frees room), nothing
      // would ever free room: the load starts anyway (a budget smaller than one adapter, or filled by pins); so
      // does one that has waited maxLoadWaitMs (steady traffic keeps some adapter in use at every moment)
      const maxWait = this.options.maxLoadWaitMs ?? 2000;
      const waited = entry.waitingSince > 0 && performance.now() - entry.waitingSince >= maxWait;
      if (!waited && (this.loading > 0 || this.residentInUse())) {
        // no adapter's size known yet (a cold start): one load at a time until one is, or a burst of
        // loads each counted as 0 bytes overshot the budget up to maxConcurrentLoads times
        const blocked = (this.loading > 0 && this.ownEstimate(entry) === 0 && !this.knowsBasesOf(entry)) || this.plannedBytes(entry) > this.options.budgetBytes;
        if (blocked) {
          if (entry.waitingSince === 0) entry.waitingSince = performance.now();
          // the wait ends by itself: nothing else may call pump meanwhile (a few long requests holding the rest)
          this.pumpAfter(entry.waitingSince + maxWait - performance.now());
          return;
        }
      }
      entry.waitingSince = 0;
      void this.load(entry);
    }
  }

  /** True when the bank tells which shared bases `entry` brings (their sizes then plan its load, cold or not). */
  private knowsBasesOf(entry: AdapterEntry): boolean {
    return entry.spec.source === 'bank' && entry.bank?.hasCompressedSlots?.(entry.id) === true;
  }

  /**
   * Forgets a folder a request named (@local:) once nothing holds, pins or loads it and it is not resident (not
   * loaded, failed, or evicted): the next request naming the folder registers it again. Kept, every folder ever
   * named stayed listed and in memory for good.
   */
  private forgetLocal(entry: AdapterEntry): void {
    if (!entry.id.startsWith(LOCAL_ADAPTER_PREFIX) || entry.users > 0 || entry.pinned) return;
    if (entry.state === 'resident' || entry.state === 'loading') return;
    if (this.entries.get(entry.id) === entry) this.entries.delete(entry.id);
  }

  private pumpTimer: NodeJS.Timeout | null = null;

  /** Calls pump once `ms` from now (one timer at a time; it never keeps the process alive). */
  private pumpAfter(ms: number): void {
    if (this.pumpTimer) return;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null;
      this.pump();
    }, Math.max(1, ms));
    this.pumpTimer.unref();
  }

  /** True when a request holds a resident adapter that is not pinned: its release would free room. */
  private residentInUse(): boolean {
    for (const e of this.entries.values()) if (e.resident && e.users > 0 && !e.pinned) return true;
    for (const e of this.staleHeld) if (e.resident) return true;
    return false;
  }

  private ownEstimate(entry: AdapterEntry): number {
    return entry.knownBytes > 0 ? entry.knownBytes : this.averageKnownBytes();
  }

  /** The mean size of the adapters whose size is known (0 when none is). */
  private averageKnownBytes(): number {
    let total = 0;
    let count = 0;
    for (const e of this.entries.values()) {
      if (e.knownBytes > 0) {
        total += e.knownBytes;
        count++;
      }
    }
    return count > 0 ? total / count : 0;
  }

  /**
   * Bytes nobody may evict once `candidate` loads: adapters held by requests or pinned, the loads in flight and the
   * candidate (own bytes known or estimated), and every shared base any of them uses, each counted once (resident
   * or not yet: an in-flight load's bases are held before its adapter is).
   */
  private plannedBytes(candidate: AdapterEntry): number {
    // only a bank's adapters have shared bases
    const bytesPerElement = WEIGHT_DTYPE_BYTES[this.bankDtype];
    let bytes = 0;
    const keys = new Set<string>();
    const addBases = (key: string, elements: number): void => {
      if (keys.has(key)) return;
      keys.add(key);
      bytes += this.bases.get(key)?.bases.bytes ?? elements * bytesPerElement;
    };
    const addResident = (resident: ResidentAdapter): void => {
      bytes += resident.bytes;
      for (const key of resident.basesKeys) addBases(key, 0);
    };
    let average: number | undefined; // a scan of every entry: once per call, however many loads are unsized
    const addPlanned = (entry: AdapterEntry): void => {
      bytes += entry.knownBytes > 0 ? entry.knownBytes : (average ??= this.averageKnownBytes());
      if (entry.spec.source === 'bank' && entry.bank?.basesOf) for (const { key, elements } of entry.bank.basesOf(entry.id)) addBases(key, elements);
    };
    for (const e of this.entries.values()) {
      if (e.resident && (e.users > 0 || e.pinned)) addResident(e.resident);
      else if (e.state === 'loading') addPlanned(e);
    }
    for (const e of this.staleHeld) {
      if (e.resident) addResident(e.resident);
      else if (e.state === 'loading') addPlanned(e);
    }
    addPlanned(candidate);
    return bytes;
  }

  private entryFor(id: string): AdapterEntry {
    const existing = this.entries.get(id);
    if (existing) return existing;
    if (this.options.bank?.has(id)) return this.register(id, { source: 'bank' });
    throw new SoppuError('ADAPTER_NOT_FOUND', `adapter ${id} is not in the bank and is not registered`, { field: 'adapter_id' });
  }

  private async load(entry: AdapterEntry): Promise<void> {
    entry.state = 'loading';
    this.loading++;
    const heldBases: string[] = [];
    let startedBases: string[] = [];
    try {
      let resident: ResidentAdapter;
      if (entry.spec.source === 'local') {
        const adapter = await this.options.loadLocal(entry.spec.dir);
        resident = residentFromLora(entry.id, adapter, this.options.slotShape, this.options.factorDtype);
      } else {
        const bank = entry.bank;
        if (!bank) throw new SoppuError('ADAPTER_NOT_FOUND', `adapter ${entry.id}: no bank is open`, { field: 'adapter_id' });
        const parts = await bank.loadAdapter(entry.id);
        const keys = new Set<string>();
        for (const part of parts.slots.values()) if (part.kind === 'compressed') keys.add(part.basesKey);
        const loaded = new Map<string, ResidentBases>();
        startedBases = [...keys];
        this.startBasesLoads(startedBases, bank);
        for (const key of keys) {
          loaded.set(key, await this.holdBases(key, bank));
          heldBases.push(key);
        }
        resident = residentFromBank(parts, loaded, this.options.slotShape, bank.dir, this.bankDtype);
      }
      if (entry.stale && entry.users === 0) {
        // removed or replaced, and released, while it loaded: nobody will use it. Its load slot and
        // budget share free up all the same, so the loads waiting for them start below.
        for (const key of heldBases) this.releaseBases(key);
        entry.state = 'disk';
      } else {
        entry.resident = resident;
        entry.knownBytes = resident.bytes;
        entry.state = 'resident';
        this.adapterBytes += resident.bytes;
        this.counts.loads++;
      }
    } catch (e) {
      for (const key of heldBases) this.releaseBases(key);
      this.dropUnheldLoads(startedBases);
      entry.state = 'failed';
      entry.error = loadError(entry, e, this.options.bank?.dir);
    } finally {
      this.loading--;
    }
    this.forgetLocal(entry);
    this.evictToFit();
    this.pump();
    this.options.onSettled?.();
  }

  /**
   * Starts loading the bases among `keys` that are neither held nor loading. With allocateBases they then move
   * into one buffer together (one adapter's missing bases are its cluster's, which load and go together), counted
   * whole while any of them is held; if any of them fails, the others are served from their own arrays, so a bad
   * file fails only its own key.
   */
  private startBasesLoads(keys: readonly string[], bank: BankReader): void {
    const fresh = keys.filter((key) => !this.bases.has(key) && !this.basesLoading.has(key));
    if (fresh.length === 0) return;
    const allocate = this.options.allocateBases;
    const dtype = this.bankDtype;
    const loads = fresh.map((key) => bank.loadBases(key));
    const pooled = allocate ? Promise.all(loads).then((all) => residentBasesInOneBuffer(all, dtype, bank.dir, allocate)) : null;
    fresh.forEach((key, i) => {
      const own = (): Promise<ResidentBases> => loads[i]!.then((bases) => residentBases(bases, dtype, bank.dir));
      const pending = pooled ? pooled.then((resident) => resident[i]!, own) : own();
      // listed until holdBases takes it into `bases`, or a failed load drops it (dropUnheldLoads): another load of
      // the cluster, or this one reaching the key later, waits for it instead of reading it again. Its failure is
      // handled by whoever awaits it; the no-op keeps it from reading as unhandled until then.
      this.basesLoading.set(key, pending);
      pending.catch(() => undefined);
    });
  }

  /**
   * After a failed load: bases it started that nobody holds once they settle leave the loading list, so they are not
   * kept unaccounted (a load awaiting one of them right now holds it first: its continuation was queued earlier; a
   * load of the same cluster that reaches one later reads it again).
   */
  private dropUnheldLoads(keys: readonly string[]): void {
    for (const key of keys) {
      const pending = this.basesLoading.get(key);
      if (!pending) continue;
      const drop = (): void => {
        if (this.basesLoading.get(key) === pending) this.basesLoading.delete(key);
      };
      pending.then(drop, drop);
    }
  }

  private async holdBases(key: string, bank: BankReader): Promise<ResidentBases> {
    const held = this.bases.get(key);
    if (held) {
      held.refs++;
      return held.bases;
    }
    if (!this.basesLoading.has(key)) this.startBasesLoads([key], bank);
    const pending = this.basesLoading.get(key)!;
    const bases = await pending;
    if (this.basesLoading.get(key) === pending) this.basesLoading.delete(key);
    const now = this.bases.get(key);
    if (now) {
      now.refs++;
      return now.bases;
    }
    this.bases.set(key, { bases, refs: 1 });
    this.basesBytes += heldBytesOf(bases, +1);
    return bases;
  }

  private releaseBases(key: string): void {
    const held = this.bases.get(key);
    if (!held) return;
    held.refs--;
    if (held.refs === 0) {
      this.bases.delete(key);
      this.basesBytes -= heldBytesOf(held.bases, -1);
    }
  }

  /** Evicts least-recently-used unheld, unpinned adapters until the budget holds. */
  private evictToFit(): void {
    if (this.bytesResident <= this.options.budgetBytes) return;
    const candidates = [...this.entries.values()]
      .filter((e) => e.state === 'resident' && e.users === 0 && !e.pinned)
      .sort((p, q) => p.lastUse - q.lastUse);
    for (const entry of candidates) {
      if (this.bytesResident <= this.options.budgetBytes) return;
      this.unload(entry);
      this.counts.evictions++;
      this.forgetLocal(entry);
    }
  }

  private unload(entry: AdapterEntry): void {
    const resident = entry.resident;
    if (!resident) return;
    this.adapterBytes -= resident.bytes;
    for (const key of resident.basesKeys) this.releaseBases(key);
    entry.resident = null;
    entry.state = 'disk';
    this.staleHeld.delete(entry);
  }

  private invalidate(id: string): void {
    const old = this.entries.get(id);
    if (!old) return;
    this.entries.delete(id);
    old.stale = true;
    if (old.users === 0) this.drop(old);
    else this.staleHeld.add(old);
    this.pump(); // dropping it may have freed room for a waiting load
  }

  private drop(entry: AdapterEntry): void {
    this.unload(entry);
    this.staleHeld.delete(entry);
    const onDrop = entry.onDrop;
    entry.onDrop = undefined;
    try {
      onDrop?.();
    } catch (e) {
      // the caller's cleanup (an upload's folder removed) failing must not fail the request releasing it
      process.emitWarning(`adapter ${entry.id}: its release callback failed: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
}

/** Wraps any load failure as ADAPTER_LOAD naming the adapter, the file and the reason. */
function loadError(entry: AdapterEntry, e: unknown, bankDir: string | undefined): SoppuError {
  const file = entry.spec.source === 'local' ? entry.spec.dir : (bankDir ?? '');
  const detailFile = isSoppuError(e) && typeof e.context.file === 'string' ? e.context.file : file;
  const reason = e instanceof Error ? e.message : String(e);
  return new SoppuError('ADAPTER_LOAD', `adapter ${entry.id} could not be loaded from ${detailFile}: ${reason}`, {
    file: detailFile,
    reason: isSoppuError(e) ? e.code : 'error',
  }, { cause: e });
}
