// Native LoRA segment ops: loraShrink, loraExpand (accumulating) and loraCore (full or diagonal),
// contracts in src/kernels/kernel-set.ts, spec in src/kernels/ref/lora.ts. Segments arrive flattened
// from TS: Int32Array starts/ends/ranks/dtypes plus a JS array of weight arrays, one per segment
// (Float32Array for f32, Uint16Array of raw bits for bf16/f16, widened in registers as the kernels load them).
#include "native-args.h"
#include "matmul.h"
#include <algorithm>
#include <array>
#include <memory>
#include <vector>

namespace soppu {
namespace scalar {
#define SOPPU_ISA 0
#include "simd.inc"
#include "lora-kernels.inc"
#undef SOPPU_ISA
}  // namespace scalar
}  // namespace soppu

SOPPU_BEGIN_AVX2
namespace soppu {
namespace avx2 {
#define SOPPU_ISA 1
#include "simd.inc"
#include "lora-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx2
}  // namespace soppu
SOPPU_END_ISA

SOPPU_BEGIN_AVX512
namespace soppu {
namespace avx512 {
#define SOPPU_ISA 2
#include "simd.inc"
#include "lora-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx512
}  // namespace soppu
SOPPU_END_ISA

namespace soppu {
namespace {

constexpr int64_t kRowTile = 4;

struct Segment {
  int64_t start, end, rank;
  const void* weights;
  int dtype;  // 0 f32, 1 bf16, 2 f16
};

constexpr int64_t kShrinkColumns = 16;  // j per shrink tile
constexpr int64_t kExpandColumns = 128; // outputs per expand tile
constexpr int64_t kMaxApplyRank = 4096; // loraApply's rank limit (its per-thread rank vectors)
constexpr double kInlineFlops = 2e5;    // loraApply below this runs on the calling thread
// loraApply rows per tile: each tile reads its segment's factors once (from memory, in a decode step)
// and works through them four rows at a time from L1, so larger tiles cut factor traffic
constexpr int64_t kApplyRowTile = 8;
// matmulLora requests its tiles' memory during the matmul from this many rows on (fewer rows: the
// matmul is bound by its own weight stream, and the requests would only compete with it)
constexpr int64_t kSidePrefetchRows = 16;

struct Tile {
  int64_t segment, r0, r1, c0, c1;  // rows [r0, r1), columns (j or o) [c0, c1)
};

/** Argument positions of one factor list: starts, ends, weights, ranks, dtypes. */
struct SegmentArgs {
  size_t starts, ends, weights, ranks, dtypes;
};

// True when `value` is the typed array a factor or core of dtype code `dtype` lives in (Float32Array for 0,
// Uint16Array of raw bits for 1 bf16 and 2 f16); sets its data and element count.
bool DtypeArray(const Napi::Env& env, const Napi::Value& value, int dtype, void** data, size_t* length) {
  napi_typedarray_type type;
  return value.IsTypedArray() && napi_get_typedarray_info(env, value, &type, length, data, nullptr, nullptr) == napi_ok &&
         type == (dtype == 0 ? napi_float32_array : napi_uint16_array);
}

// Fails with `where` + the limit unless `dtype` is a dtype code: 0 f32, 1 bf16, 2 f16.
bool DtypeCodeOk(const Napi::Env& env, const std::string& where, int dtype) {
  if (dtype >= 0 && dtype <= 2) return true;
  return Fail(env, where + "dtype code " + std::to_string(dtype) + " is not 0 (f32), 1 (bf16) or 2 (f16)");
}

/**
 * Reads segments from (starts, ends, weights, ranks, dtypes) at the argument positions `at` and checks each:
 * rows within [0, maxRows), rank in [1, maxRank], weights a Float32Array (dtype 0) or Uint16Array
 * (dtype 1 bf16, 2 f16) of at least rank·weightCols elements.
 */
bool ReadSegments(const Napi::CallbackInfo& info, SegmentArgs at, const char* op, const char* weightName,
                  int64_t maxRows, int64_t maxRank, int64_t weightCols, std::vector<Segment>* segments) {
  const Napi::Env env = info.Env();
  ArrayArg<int32_t> starts, ends, ranks, dtypes;
  if (!GetI32(info, at.starts, op, "starts", &starts) || !GetI32(info, at.ends, op, "ends", &ends) ||
      !GetI32(info, at.ranks, op, "ranks", &ranks) || !GetI32(info, at.dtypes, op, "dtypes", &dtypes))
    return false;
  if (!info[at.weights].IsArray()) return Fail(env, std::string("soppu native ") + op + ": " + weightName + " must be an array");
  const Napi::Array weights = info[at.weights].As<Napi::Array>();
  const int64_t count = weights.Length();
  if (!NeedLength(env, op, "starts", starts.length, count) || !NeedLength(env, op, "ends", ends.length, count) ||
      !NeedLength(env, op, "ranks", ranks.length, count) || !NeedLength(env, op, "dtypes", dtypes.length, count))
    return false;
  for (int64_t s = 0; s < count; s++) {
    const auto where = [&] { return std::string("soppu native ") + op + ": segment " + std::to_string(s) + ": "; };
    const int64_t start = starts.data[s], end = ends.data[s], rank = ranks.data[s];
    if (start < 0 || end < start || end > maxRows)
      return Fail(env, where() + "rows [" + std::to_string(start) + ", " + std::to_string(end) + ") outside [0, " +
                           std::to_string(maxRows) + ")");
    if (rank < 1 || rank > maxRank)
      return Fail(env, where() + "rank " + std::to_string(rank) + " outside [1, " + std::to_string(maxRank) + "]");
    const int dtype = dtypes.data[s];
    if (!DtypeCodeOk(env, where(), dtype)) return false;
    size_t length = 0;
    void* data = nullptr;
    if (!DtypeArray(env, weights.Get(static_cast<uint32_t>(s)), dtype, &data, &length))
      return Fail(env, where() + weightName + (dtype == 0 ? " must be a Float32Array" : " must be a Uint16Array"));
    if (static_cast<int64_t>(length) < rank * weightCols)
      return Fail(env, where() + weightName + " has " + std::to_string(length) + " elements, needs " +
                           std::to_string(rank * weightCols));
    segments->push_back(Segment{start, end, rank, data, dtype});
  }
  return true;
}

/**
 * Reads the cores at info[first] (a JS array of Float32Array) against coreRanks/coreDiagonal and
 * checks that each rank is in [1, maxRank], each array is long enough, and coreOfRow names cores
 * that exist (−1 = none).
 */
bool ReadCores(const Napi::CallbackInfo& info, size_t first, const char* op, int64_t maxRank, int64_t rows,
               const ArrayArg<int32_t>& coreOfRow, const ArrayArg<int32_t>& ranks, const ArrayArg<int32_t>& diagonal,
               const ArrayArg<int32_t>& dtypes, std::vector<const void*>* cores) {
  const Napi::Env env = info.Env();
  if (!info[first].IsArray()) return Fail(env, std::string("soppu native ") + op + ": cores must be an array");
  const Napi::Array coreArrays = info[first].As<Napi::Array>();
  const int64_t count = coreArrays.Length();
  if (!NeedLength(env, op, "coreRanks", ranks.length, count) || !NeedLength(env, op, "coreDiagonal", diagonal.length, count) ||
      !NeedLength(env, op, "coreDtypes", dtypes.length, count) || !NeedLength(env, op, "coreOfRow", coreOfRow.length, rows))
    return false;
  for (int64_t c = 0; c < count; c++) {
    const int64_t rank = ranks.data[c];
    const auto where = [&] { return std::string("soppu native ") + op + ": core " + std::to_string(c) + ": "; };
    if (rank < 1 || rank > maxRank)
      return Fail(env, where() + "rank " + std::to_string(rank) + " outside [1, " + std::to_string(maxRank) + "]");
    size_t length = 0;
    void* data = nullptr;
    const int32_t dtype = dtypes.data[c];
    if (!DtypeCodeOk(env, where(), dtype)) return false;
    if (!DtypeArray(env, coreArrays.Get(static_cast<uint32_t>(c)), dtype, &data, &length))
      return Fail(env, where() + (dtype == 0 ? "data must be a Float32Array (dtype f32)" : "data must be a Uint16Array (dtype bf16 or f16)"));
    const int64_t needed = diagonal.data[c] ? rank : rank * rank;
    if (static_cast<int64_t>(length) < needed)
      return Fail(env, where() + "data has " + std::to_string(length) + " elements, needs " + std::to_string(needed));
    cores->push_back(data);
  }
  for (int64_t r = 0; r < rows; r++)
    if (coreOfRow.data[r] < -1 || coreOfRow.data[r] >= count)
      return Fail(env, std::string("soppu native ") + op + ": row " + std::to_string(r) + " names core " +
                           std::to_string(coreOfRow.data[r]) + " of " + std::to_string(count));
  return true;
}

bool Disjoint(const std::vector<Segment>& segments) {
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const Segment& s : segments)
    if (s.end > s.start) spans.emplace_back(s.start, s.end);
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); i++)
    if (spans[i].first < spans[i - 1].second) return false;
  return true;
}

// Tiles of every segment, in segment order; columns [0, columns(segment)) in tiles of columnTile.
template <typename Columns>
std::vector<Tile> MakeTiles(const std::vector<Segment>& segments, int64_t columnTile, Columns columns,
                            std::vector<size_t>* segmentFirstTile, int64_t rowTile = kRowTile) {
  std::vector<Tile> tiles;
  for (size_t s = 0; s < segments.size(); s++) {
    segmentFirstTile->push_back(tiles.size());
    const int64_t total = columns(segments[s]);
    for (int64_t r = segments[s].start; r < segments[s].end; r += rowTile)
      for (int64_t c = 0; c < total; c += columnTile)
        tiles.push_back(Tile{static_cast<int64_t>(s), r, std::min(r + rowTile, segments[s].end), c,
                             std::min(c + columnTile, total)});
  }
  segmentFirstTile->push_back(tiles.size());
  return tiles;
}

// Runs every tile; all at once when segments are disjoint (no two tiles write one element), else
// one segment after another, as the reference does, so overlapping segments keep its meaning.
// `inlineOnly` runs everything on the calling thread (jobs too small to repay a pool dispatch).
template <typename Fn>
void RunTiles(bool disjoint, const std::vector<Tile>& tiles, const std::vector<size_t>& segmentFirstTile, bool inlineOnly,
              Fn fn) {
  const auto body = [&](size_t offset) {
    return [&, offset](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i++) fn(tiles[offset + static_cast<size_t>(i)]);
    };
  };
  if (inlineOnly) {
    body(0)(0, static_cast<int64_t>(tiles.size()));
    return;
  }
  if (disjoint) {
    ParallelFor(static_cast<int64_t>(tiles.size()), 1, body(0));
    return;
  }
  for (size_t s = 0; s + 1 < segmentFirstTile.size(); s++) {
    const size_t first = segmentFirstTile[s], last = segmentFirstTile[s + 1];
    ParallelFor(static_cast<int64_t>(last - first), 1, body(first));
  }
}

// Asks for [data, data + bytes) to be brought into cache: to L1 (kLocality 3) or L2 (2).
template <int kLocality>
void PrefetchBytes(const void* data, int64_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, kLocality);
}

int64_t FactorBytes(const Segment& segment, int64_t cols) { return segment.rank * cols * (segment.dtype == 0 ? 4 : 2); }

// Per-thread scratch (loraApply's rank vectors), reused across calls.
float* TileScratch(int64_t floats) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < floats) scratch.resize(static_cast<size_t>(floats));
  return scratch.data();
}

// loraShrink(isa, t, tStride, x, k, rows, starts, ends, weights (a: [R, k] each), ranks, dtypes)
Napi::Value LoraShrink(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "loraShrink";
  ArrayArg<float> t, x;
  int64_t tStride, k, rows;
  if (!GetF32(info, 1, op, "t", &t) || !GetInt(info, 2, op, "tStride", 1, &tStride) || !GetF32(info, 3, op, "x", &x) ||
      !GetInt(info, 4, op, "k", 1, &k) || !GetInt(info, 5, op, "rows", 0, &rows) ||
      !NeedLength(env, op, "t", t.length, rows * tStride) || !NeedLength(env, op, "x", x.length, rows * k))
    return env.Undefined();
  std::vector<Segment> segments;
  if (!ReadSegments(info, {6, 7, 8, 9, 10}, op, "a", rows, tStride, k, &segments)) return env.Undefined();
  std::vector<size_t> firstTile;
  const std::vector<Tile> tiles = MakeTiles(segments, kShrinkColumns, [](const Segment& s) { return s.rank; }, &firstTile);
  RunTiles(Disjoint(segments), tiles, firstTile, false, [&](const Tile& tile) {
    const Segment& segment = segments[static_cast<size_t>(tile.segment)];
    SOPPU_DISPATCH(isa, ShrinkTileAny(t.data, tStride, x.data, k, segment.weights, segment.dtype, tile.r0, tile.r1, tile.c0,
                                      tile.c1));
  });
  return env.Undefined();
}

// loraExpand(isa, y, n, t, tStride, rows, starts, ends, weights (bt: [R, n] each), ranks, dtypes)
Napi::Value LoraExpand(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "loraExpand";
  ArrayArg<float> y, t;
  int64_t n, tStride, rows;
  if (!GetF32(info, 1, op, "y", &y) || !GetInt(info, 2, op, "n", 1, &n) || !GetF32(info, 3, op, "t", &t) ||
      !GetInt(info, 4, op, "tStride", 1, &tStride) || !GetInt(info, 5, op, "rows", 0, &rows) ||
      !NeedLength(env, op, "y", y.length, rows * n) || !NeedLength(env, op, "t", t.length, rows * tStride))
    return env.Undefined();
  std::vector<Segment> segments;
  if (!ReadSegments(info, {6, 7, 8, 9, 10}, op, "bt", rows, tStride, n, &segments)) return env.Undefined();
  std::vector<size_t> firstTile;
  const std::vector<Tile> tiles = MakeTiles(segments, kExpandColumns, [n](const Segment&) { return n; }, &firstTile);
  RunTiles(Disjoint(segments), tiles, firstTile, false, [&](const Tile& tile) {
    const Segment& segment = segments[static_cast<size_t>(tile.segment)];
    SOPPU_DISPATCH(isa, ExpandTileAny(y.data, n, t.data, tStride, segment.weights, segment.dtype, segment.rank, tile.r0,
                                      tile.r1, tile.c0, tile.c1));
  });
  return env.Undefined();
}

// loraCore(isa, out, t, stride, rows, coreOfRow (Int32Array [rows], −1 = none), cores (Float32Array, or
// Uint16Array of bf16/f16 bits, each), coreRanks (Int32Array), coreDiagonal (Int32Array, 0/1), coreDtypes
// (Int32Array: 0 f32, 1 bf16, 2 f16))
Napi::Value LoraCore(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "loraCore";
  ArrayArg<float> out, t;
  ArrayArg<int32_t> coreOfRow, ranks, diagonal, dtypes;
  int64_t stride, rows;
  if (!GetF32(info, 1, op, "out", &out) || !GetF32(info, 2, op, "t", &t) || !GetInt(info, 3, op, "stride", 1, &stride) ||
      !GetInt(info, 4, op, "rows", 0, &rows) || !GetI32(info, 5, op, "coreOfRow", &coreOfRow) ||
      !GetI32(info, 7, op, "coreRanks", &ranks) || !GetI32(info, 8, op, "coreDiagonal", &diagonal) ||
      !GetI32(info, 9, op, "coreDtypes", &dtypes) || !NeedLength(env, op, "out", out.length, rows * stride) || !NeedLength(env, op, "t", t.length, rows * stride) ||
      !NeedLength(env, op, "coreOfRow", coreOfRow.length, rows))
    return env.Undefined();
  std::vector<const void*> cores;
  if (!ReadCores(info, 6, op, stride, rows, coreOfRow, ranks, diagonal, dtypes, &cores)) return env.Undefined();
  ParallelFor(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int32_t c = coreOfRow.data[r];
      if (c < 0) continue;
      SOPPU_DISPATCH(isa, CoreRow(out.data, t.data, stride, r, cores[static_cast<size_t>(c)], dtypes.data[c], ranks.data[c], diagonal.data[c] != 0));
    }
  });
  return env.Undefined();
}

// A checked loraApply call without its x and y: the segments' factor pointers, the cores, and the tiles.
// Built once per segments array (the engine reuses one per batch composition) so a decode step's call
// reads three arguments instead of ~40 JS objects, which cost more than a small slot's kernel when they
// are cold in cache. The pointers stay valid because the JS side keeps every array alive beside the
// plan, and the engine never detaches an adapter's buffers.
struct ApplyPlan {
  int64_t n = 0, k = 0, rows = 0;
  std::vector<Segment> shrink, expand;  // one per segment, same rows, same rank
  std::vector<const void*> cores;
  std::vector<int32_t> coreOfRow, coreDiagonal, coreDtype;  // core ranks are checked against the segments at build
  std::vector<Tile> tiles;
  std::vector<size_t> firstTile;
  std::vector<int64_t> rankOffset;  // matmulLora: tile p's rank vectors start at rankOffset[p] (floats); last = total
  std::vector<PrefetchRange> prefetch;  // matmulLora: what the tiles read, in tile order (requested during its matmul)
  int64_t prefetchLines = 0;
  bool disjoint = true, inlineOnly = false;
  int64_t heapBytes = 0;  // reported to V8 as external memory while the JS value lives

  // bytes of core c of a segment of rank `rank` (full: rank², diagonal: rank values of its dtype)
  int64_t CoreBytes(int32_t c, int64_t rank) const {
    const size_t i = static_cast<size_t>(c);
    return (coreDiagonal[i] ? rank : rank * rank) * (coreDtype[i] == 0 ? 4 : 2);
  }
};

// Completes a plan whose segments, cores and coreOfRow are set: its tiles, their rank-vector offsets and the
// memory they read (in the order they run), and whether it runs inline; returns it as the opaque JS value.
Napi::Value PlanValue(const Napi::Env& env, std::unique_ptr<ApplyPlan> owned) {
  ApplyPlan& p = *owned;
  const int64_t n = p.n, k = p.k;
  const std::vector<Segment>& shrink = p.shrink;
  p.tiles = MakeTiles(shrink, n, [n](const Segment&) { return n; }, &p.firstTile, kApplyRowTile);
  double flops = 0;
  for (const Segment& segment : shrink) flops += 2.0 * static_cast<double>((segment.end - segment.start) * segment.rank * (k + n));
  p.inlineOnly = flops < kInlineFlops;
  p.rankOffset.assign(1, 0);
  for (const Tile& tile : p.tiles)
    p.rankOffset.push_back(p.rankOffset.back() + (tile.r1 - tile.r0) * shrink[static_cast<size_t>(tile.segment)].rank);
  p.disjoint = Disjoint(shrink);
  // the tiles' memory in the order the tiles run: per segment its A, each row's core, its Bᵀ
  const auto addRange = [&](const void* data, int64_t bytes) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(data) & ~uintptr_t{63};
    const int64_t lines = static_cast<int64_t>((reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes) - first + 63) / 64);
    p.prefetch.push_back(PrefetchRange{reinterpret_cast<const char*>(first), lines});
    p.prefetchLines += lines;
  };
  for (size_t s = 0; s < shrink.size(); s++) {
    if (shrink[s].end <= shrink[s].start) continue;
    addRange(shrink[s].weights, FactorBytes(shrink[s], k));
    for (int64_t r = shrink[s].start; r < shrink[s].end; r++) {
      const int32_t c = p.coreOfRow[static_cast<size_t>(r)];
      if (c >= 0) addRange(p.cores[static_cast<size_t>(c)], p.CoreBytes(c, shrink[s].rank));
    }
    addRange(p.expand[s].weights, FactorBytes(p.expand[s], n));
  }
  // V8 does not see this memory unless told: a batch that changes composition often makes a plan per slot each
  // time, and without the report their garbage piled up between collections (server bench RSS +50-70 MiB)
  p.heapBytes = static_cast<int64_t>(sizeof(ApplyPlan) + (p.shrink.capacity() + p.expand.capacity()) * sizeof(Segment) +
                                     p.cores.capacity() * sizeof(const void*) +
                                     (p.coreOfRow.capacity() + p.coreDiagonal.capacity() + p.coreDtype.capacity()) * sizeof(int32_t) +
                                     p.tiles.capacity() * sizeof(Tile) + (p.firstTile.capacity() + p.rankOffset.capacity()) * 8 +
                                     p.prefetch.capacity() * sizeof(PrefetchRange));
  Napi::MemoryManagement::AdjustExternalMemory(env, p.heapBytes);
  return Napi::External<ApplyPlan>::New(env, owned.release(), [](Napi::Env finalizerEnv, ApplyPlan* plan) {
    Napi::MemoryManagement::AdjustExternalMemory(finalizerEnv, -plan->heapBytes);
    delete plan;
  });
}

// loraApplyPlan(isa (unused: a plan is the same for every variant), n, k, rows, starts, ends, aWeights, aRanks,
//               aDtypes, btWeights, btRanks, btDtypes, coreOfRow (Int32Array [rows], −1 = none), cores,
//               coreRanks, coreDiagonal, coreDtypes) → an opaque plan for loraApply
Napi::Value LoraApplyPlan(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const char* op = "loraApply";
  ArrayArg<int32_t> coreOfRow, coreRanks, coreDiagonal, coreDtypes;
  auto plan = std::make_unique<ApplyPlan>();
  if (!GetInt(info, 1, op, "n", 1, &plan->n) || !GetInt(info, 2, op, "k", 1, &plan->k) ||
      !GetInt(info, 3, op, "rows", 0, &plan->rows) || !GetI32(info, 12, op, "coreOfRow", &coreOfRow) ||
      !GetI32(info, 14, op, "coreRanks", &coreRanks) || !GetI32(info, 15, op, "coreDiagonal", &coreDiagonal) ||
      !GetI32(info, 16, op, "coreDtypes", &coreDtypes))
    return env.Undefined();
  const int64_t n = plan->n, k = plan->k, rows = plan->rows;
  // the a and bt lists share starts and ends
  if (!ReadSegments(info, {4, 5, 6, 7, 8}, op, "a", rows, kMaxApplyRank, k, &plan->shrink) ||
      !ReadSegments(info, {4, 5, 9, 10, 11}, op, "bt", rows, kMaxApplyRank, n, &plan->expand))
    return env.Undefined();
  const std::vector<Segment>& shrink = plan->shrink;
  if (shrink.size() != plan->expand.size()) {
    Fail(env, "soppu native loraApply: " + std::to_string(shrink.size()) + " a factors but " + std::to_string(plan->expand.size()) + " bt factors");
    return env.Undefined();
  }
  for (size_t s = 0; s < shrink.size(); s++)
    if (shrink[s].rank != plan->expand[s].rank) {
      Fail(env, std::string("soppu native loraApply: segment ") + std::to_string(s) + ": a has rank " +
                    std::to_string(shrink[s].rank) + ", bt has rank " + std::to_string(plan->expand[s].rank));
      return env.Undefined();
    }
  if (!ReadCores(info, 13, op, kMaxApplyRank, rows, coreOfRow, coreRanks, coreDiagonal, coreDtypes, &plan->cores)) return env.Undefined();
  for (const Segment& segment : shrink)
    for (int64_t r = segment.start; r < segment.end; r++) {
      const int32_t c = coreOfRow.data[r];
      if (c >= 0 && coreRanks.data[c] != segment.rank) {
        Fail(env, "soppu native loraApply: row " + std::to_string(r) + " has a core of rank " +
                      std::to_string(coreRanks.data[c]) + ", its segment rank " + std::to_string(segment.rank));
        return env.Undefined();
      }
    }
  const size_t coreCount = plan->cores.size();
  plan->coreOfRow.assign(coreOfRow.data, coreOfRow.data + rows);
  plan->coreDiagonal.assign(coreDiagonal.data, coreDiagonal.data + coreCount);
  plan->coreDtype.assign(coreDtypes.data, coreDtypes.data + coreCount);
  return PlanValue(env, std::move(plan));
}

// loraPlanRows(isa (unused), plan from loraApplyPlan, rowOf: Int32Array [rows], added (optional): a plan from
// loraApplyPlan of work on rows that map to none of the plan's) → the plan of the same adapter work at new rows,
// as KernelSet.loraRows defines it: row i is the plan's row rowOf[i] (a negative index, or a row outside every
// segment: no work). Per segment, in order, one segment per run of rows mapping into it; a row keeps its core.
// The added plan's segments and cores join them: all segments by start, and one starting where the one before
// ends over the same factors merged into it (as a plan built from the rows would have them).
// Built from the plan alone: its factors and cores were checked when it was made, and the JS side keeps
// them alive beside the new plan too, so a batch whose rows change but not its adapters reads no JS objects.
Napi::Value LoraPlanRows(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const char* op = "loraRows";
  if (!info[1].IsExternal()) {
    Fail(env, "soppu native loraRows: plan must come from loraApplyPlan");
    return env.Undefined();
  }
  const ApplyPlan& from = *info[1].As<Napi::External<ApplyPlan>>().Data();
  ArrayArg<int32_t> rowOf;
  if (!GetI32(info, 2, op, "rowOf", &rowOf)) return env.Undefined();
  const int64_t rows = static_cast<int64_t>(rowOf.length);
  auto plan = std::make_unique<ApplyPlan>();
  plan->n = from.n;
  plan->k = from.k;
  plan->cores = from.cores;
  plan->coreDiagonal = from.coreDiagonal;
  plan->coreDtype = from.coreDtype;
  for (size_t s = 0; s < from.shrink.size(); s++) {
    const Segment& a = from.shrink[s];
    const auto inside = [&](int64_t i) { return rowOf.data[i] >= a.start && rowOf.data[i] < a.end; };
    for (int64_t i = 0; i < rows; i++) {
      if (!inside(i)) continue;
      const int64_t start = i;
      while (i < rows && inside(i)) i++;
      plan->shrink.push_back(Segment{start, i, a.rank, a.weights, a.dtype});
      plan->expand.push_back(Segment{start, i, a.rank, from.expand[s].weights, from.expand[s].dtype});
      plan->rows = std::max(plan->rows, i);
    }
  }
  const ApplyPlan* added = info.Length() > 3 && info[3].IsExternal() ? info[3].As<Napi::External<ApplyPlan>>().Data() : nullptr;
  if (added && (added->n != from.n || added->k != from.k)) {
    Fail(env, "soppu native loraRows: the added plan is [" + std::to_string(added->n) + ", " + std::to_string(added->k) +
                  "], the carried one [" + std::to_string(from.n) + ", " + std::to_string(from.k) + "]");
    return env.Undefined();
  }
  const size_t carried = plan->shrink.size();
  if (added) {
    // the added work is on rows the carried plan leaves alone: a row of both would get the added core in the
    // carried segment's tiles, whose rank the core was never checked against
    std::vector<bool> covered(static_cast<size_t>(std::max(plan->rows, added->rows)), false);
    for (size_t s = 0; s < carried; s++)
      for (int64_t i = plan->shrink[s].start; i < plan->shrink[s].end; i++) covered[static_cast<size_t>(i)] = true;
    for (const Segment& segment : added->shrink)
      for (int64_t i = segment.start; i < segment.end; i++)
        if (covered[static_cast<size_t>(i)]) {
          Fail(env, "soppu native loraRows: the added work covers row " + std::to_string(i) + ", which the carried plan covers too");
          return env.Undefined();
        }
    plan->shrink.insert(plan->shrink.end(), added->shrink.begin(), added->shrink.end());
    plan->expand.insert(plan->expand.end(), added->expand.begin(), added->expand.end());
    plan->cores.insert(plan->cores.end(), added->cores.begin(), added->cores.end());
    plan->coreDiagonal.insert(plan->coreDiagonal.end(), added->coreDiagonal.begin(), added->coreDiagonal.end());
    plan->coreDtype.insert(plan->coreDtype.end(), added->coreDtype.begin(), added->coreDtype.end());
    plan->rows = std::max(plan->rows, added->rows);
  }
  // rows outside every segment keep no core: a plan never reads one there
  plan->coreOfRow.assign(static_cast<size_t>(plan->rows), -1);
  for (size_t s = 0; s < plan->shrink.size(); s++) {
    const Segment& segment = plan->shrink[s];
    for (int64_t i = segment.start; i < segment.end; i++) {
      const int32_t core = s < carried ? from.coreOfRow[static_cast<size_t>(rowOf.data[i])] : added->coreOfRow[static_cast<size_t>(i)];
      plan->coreOfRow[static_cast<size_t>(i)] = s < carried || core < 0 ? core : core + static_cast<int32_t>(from.cores.size());
    }
  }
  if (added) {
    // by start (stable), then runs over the same factors merged
    std::vector<size_t> order(plan->shrink.size());
    for (size_t s = 0; s < order.size(); s++) order[s] = s;
    std::stable_sort(order.begin(), order.end(), [&](size_t p, size_t q) { return plan->shrink[p].start < plan->shrink[q].start; });
    std::vector<Segment> shrink, expand;
    for (const size_t s : order) {
      const Segment& a = plan->shrink[s];
      const Segment& b = plan->expand[s];
      const bool sameFactors = !shrink.empty() && shrink.back().weights == a.weights && shrink.back().rank == a.rank &&
                               shrink.back().dtype == a.dtype && expand.back().weights == b.weights && expand.back().dtype == b.dtype;
      if (sameFactors && shrink.back().end == a.start) {
        shrink.back().end = a.end;
        expand.back().end = b.end;
      } else {
        shrink.push_back(a);
        expand.push_back(b);
      }
    }
    plan->shrink = std::move(shrink);
    plan->expand = std::move(expand);
  }
  return PlanValue(env, std::move(plan));
}

// u[0:count, 0:rank] = per row of the tile, core · (a · x[row]) (a · x[row] for a row without a core),
// after asking for the tile's A and cores (to L1) and Bᵀ (to L2): in a decode step every factor and core
// is cold (a step reads more LoRA bytes than the cache holds), and factor rows a few cache lines long
// stream poorly through the hardware prefetchers, so the whole tile is requested at once.
void ShrinkCoreTile(Isa isa, const ApplyPlan& plan, const Tile& tile, const float* x, float* u) {
  const Segment& a = plan.shrink[static_cast<size_t>(tile.segment)];
  const Segment& bt = plan.expand[static_cast<size_t>(tile.segment)];
  const int64_t rank = a.rank, count = tile.r1 - tile.r0, k = plan.k;
  float* t = TileScratch(kApplyRowTile * rank);  // [count, rank]
  PrefetchBytes<3>(a.weights, FactorBytes(a, k));
  for (int64_t q = 0; q < count; q++) {
    const int32_t c = plan.coreOfRow[static_cast<size_t>(tile.r0 + q)];
    if (c >= 0) PrefetchBytes<3>(plan.cores[static_cast<size_t>(c)], plan.CoreBytes(c, rank));
  }
  PrefetchBytes<2>(bt.weights, FactorBytes(bt, plan.n));
  const float* xTile = x + tile.r0 * k;
  for (int64_t j0 = 0; j0 < rank; j0 += kShrinkColumns)
    SOPPU_DISPATCH(isa, ShrinkTileAny(t, rank, xTile, k, a.weights, a.dtype, 0, count, j0, std::min(j0 + kShrinkColumns, rank)));
  for (int64_t q = 0; q < count; q++) {
    const int32_t c = plan.coreOfRow[static_cast<size_t>(tile.r0 + q)];
    if (c < 0) {
      std::copy(t + q * rank, t + (q + 1) * rank, u + q * rank);
      continue;
    }
    SOPPU_DISPATCH(isa, CoreRow(u, t, rank, q, plan.cores[static_cast<size_t>(c)], plan.coreDtype[static_cast<size_t>(c)], rank,
                                plan.coreDiagonal[static_cast<size_t>(c)] != 0));
  }
}

// y[r0:r1, :] += u[0:count, 0:rank] · bt of the tile's segment, over every column, in chunks of
// kExpandColumns. A 16-bit bt's next chunk (rank short runs, too many streams for the hardware
// prefetcher) is asked into L1 before each chunk runs: bf16 compressed step -0.08 to -0.15 ms in five
// of five paired runs (scratch, batch 32); with f32 factors it gained nothing, or cost up to 0.8 ms (raw).
void ExpandRowTile(Isa isa, const ApplyPlan& plan, const Tile& tile, const float* u, float* y) {
  const Segment& bt = plan.expand[static_cast<size_t>(tile.segment)];
  const int64_t n = plan.n;
  for (int64_t o0 = 0; o0 < n; o0 += kExpandColumns) {
    const int64_t next = o0 + kExpandColumns;
    if (bt.dtype != 0 && next < n)
      for (int64_t j = 0; j < bt.rank; j++)
        PrefetchBytes<3>(static_cast<const uint16_t*>(bt.weights) + j * n + next, std::min(kExpandColumns, n - next) * 2);
    SOPPU_DISPATCH(isa, ExpandTileAny(y + tile.r0 * n, n, u, bt.rank, bt.weights, bt.dtype, bt.rank, 0, tile.r1 - tile.r0, o0,
                                      std::min(next, n)));
  }
}

// One loraApply tile: y[r0:r1, :] += per row, (core ·) (a · x[row]) · bt.
void ApplyTile(Isa isa, const ApplyPlan& plan, const Tile& tile, const float* x, float* y) {
  const int64_t rank = plan.expand[static_cast<size_t>(tile.segment)].rank;
  // [count, rank] after ShrinkCoreTile's t (asked for first: the scratch only grows, so t stays put)
  float* u = TileScratch(2 * kApplyRowTile * rank) + kApplyRowTile * rank;
  ShrinkCoreTile(isa, plan, tile, x, u);
  ExpandRowTile(isa, plan, tile, u, y);
}

// Parts [0, count) of a checked group (every part with the same x, m and k; plans[p] null for a part without
// adapter work) as ONE pool job: see MatmulGroup.
void RunGroup(Isa isa, const float* x, const MatmulArgs* parts, const ApplyPlan* const* plans, int64_t count) {
  const int64_t m = parts[0].m;
  bool allDisjoint = true, allNarrow = true;
  for (int64_t p = 0; p < count; p++) {
    allDisjoint = allDisjoint && (!plans[p] || plans[p]->disjoint);
    allNarrow = allNarrow && parts[p].dtype != WeightDtype::F32;
  }
  std::array<int64_t, kMaxMatmulParts + 1> firstTile{}, firstRank{};  // part p's tiles and rank vectors start here
  for (int64_t p = 0; p < count; p++) {
    firstTile[p + 1] = firstTile[p] + (plans[p] ? static_cast<int64_t>(plans[p]->tiles.size()) : 0);
    firstRank[p + 1] = firstRank[p] + (plans[p] ? plans[p]->rankOffset.back() : 0);
  }
  const int64_t tiles = firstTile[count];
  if (tiles == 0) {
    MatmulParts(isa, parts, count);
    return;
  }
  if (!allDisjoint) {  // overlapping segments: one after another, as loraApply runs them
    MatmulParts(isa, parts, count);
    for (int64_t p = 0; p < count; p++)
      if (plans[p])
        RunTiles(false, plans[p]->tiles, plans[p]->firstTile, false,
                 [&](const Tile& tile) { ApplyTile(isa, *plans[p], tile, x, parts[p].y); });
    return;
  }
  // tile t of the group: part p's tile t - firstTile[p]
  const auto partOf = [&](int64_t t) {
    int64_t p = 0;
    while (t >= firstTile[p + 1]) p++;
    return p;
  };
  // every tile's rank vectors: part p's tile i's, u: [tile rows, rank] from firstRank[p] + its plan's rankOffset[i]
  std::vector<float> rankVectors(static_cast<size_t>(firstRank[count]));
  const auto rankVectorsOf = [&](int64_t p, int64_t i) { return rankVectors.data() + firstRank[p] + plans[p]->rankOffset[static_cast<size_t>(i)]; };
  MatmulFusion fusion;
  fusion.tasks = tiles;  // shrink and core: read only x, so they start during the matmuls' tail
  fusion.run = [&](int64_t t) {
    const int64_t p = partOf(t), i = t - firstTile[p];
    ShrinkCoreTile(isa, *plans[p], plans[p]->tiles[static_cast<size_t>(i)], x, rankVectorsOf(p, i));
  };
  fusion.finalTasks = tiles;  // expand: once the matmuls have written every y
  fusion.runFinal = [&](int64_t t) {
    const int64_t p = partOf(t), i = t - firstTile[p];
    ExpandRowTile(isa, *plans[p], plans[p]->tiles[static_cast<size_t>(i)], rankVectorsOf(p, i), parts[p].y);
  };
  // The matmuls' blocks request the tiles' factors and cores a few lines per block tile, so they arrive
  // while they compute. That pays where the matmuls leave memory bandwidth spare: 16-bit weights with at
  // least kSidePrefetchRows rows. An f32 W streams twice the bytes per multiply-add, and with the extra
  // requests it slowed down more than the tiles sped up (see docs/architecture.md).
  // (MatmulGroup runs each part alone from kSidePrefetchRows rows on, so a job that requests has one plan.)
  if (allNarrow && m >= kSidePrefetchRows && count == 1) {
    fusion.prefetch = &plans[0]->prefetch;
    fusion.prefetchLines = plans[0]->prefetchLines;
  }
  MatmulParts(isa, parts, count, &fusion);
}

// matmulGroup(isa, x: [m, k], m, k, parts: a flat array of (y: [m, n], w: [n, k] (Float32Array, or Uint16Array of
// bf16/f16 bits), wDtype (0 f32, 1 bf16, 2 f16), n, plan from loraApplyPlan or undefined) per part): per part,
// y = x · wᵀ, then with a plan loraApply's delta, in ONE pool job (below kSidePrefetchRows rows; see the end):
// every part's matmul blocks (the parts' weights in turn), then every tile's shrink and core (they read only x,
// so a thread that runs out of blocks starts them while the others finish theirs), then every tile's expand
// (once the matmuls and the rank vectors are done). A decode step of few rows so pays one dispatch and one
// weight stream per group of linears that read one x (q, k, v; gate, up), the LoRA work overlaps the matmuls'
// tail, and the threads share it evenly. matmulLora is a group of one.
Napi::Value MatmulGroup(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "matmulGroup";
  constexpr uint32_t kFields = 5;  // y, w, wDtype, n, plan
  ArrayArg<float> x;
  int64_t m, k;
  if (!GetF32(info, 1, op, "x", &x) || !GetInt(info, 2, op, "m", 0, &m) || !GetInt(info, 3, op, "k", 0, &k) ||
      !NeedLength(env, op, "x", x.length, m * k))
    return env.Undefined();
  if (!info[4].IsArray()) return Fail(env, "soppu native matmulGroup: parts must be an array"), env.Undefined();
  const Napi::Array flat = info[4].As<Napi::Array>();
  const int64_t count = flat.Length() / kFields;
  if (flat.Length() % kFields != 0 || count < 1 || count > kMaxMatmulParts) {
    Fail(env, "soppu native matmulGroup: parts holds " + std::to_string(flat.Length()) + " values, not 5 per part for 1 to " +
                  std::to_string(kMaxMatmulParts) + " parts");
    return env.Undefined();
  }
  std::array<MatmulArgs, kMaxMatmulParts> parts;
  std::array<const ApplyPlan*, kMaxMatmulParts> plans{};
  for (int64_t p = 0; p < count; p++) {
    const std::string where = "soppu native matmulGroup: part " + std::to_string(p) + ": ";
    const Napi::Value yValue = flat[static_cast<uint32_t>(p * kFields)], wValue = flat[static_cast<uint32_t>(p * kFields + 1)];
    const Napi::Value dtypeValue = flat[static_cast<uint32_t>(p * kFields + 2)], nValue = flat[static_cast<uint32_t>(p * kFields + 3)];
    const Napi::Value planValue = flat[static_cast<uint32_t>(p * kFields + 4)];
    int64_t n, dtypeCode;
    if (!IntValue(env, nValue, 0, &n, [&] { return where + "n"; }) ||
        !IntValue(env, dtypeValue, 0, &dtypeCode, [&] { return where + "wDtype"; }) ||
        !DtypeCodeOk(env, where + "w ", static_cast<int>(dtypeCode)))
      return env.Undefined();
    const int dtype = static_cast<int>(dtypeCode);
    void* y = nullptr;
    void* w = nullptr;
    size_t yLength = 0, wLength = 0;
    if (!DtypeArray(env, yValue, 0, &y, &yLength)) return Fail(env, where + "y must be a Float32Array"), env.Undefined();
    if (!DtypeArray(env, wValue, dtype, &w, &wLength))
      return Fail(env, where + "w must be a Float32Array (wDtype 0) or Uint16Array (wDtype 1, 2)"), env.Undefined();
    if (!NeedLength(env, op, "y", static_cast<int64_t>(yLength), m * n) || !NeedLength(env, op, "w", static_cast<int64_t>(wLength), n * k))
      return env.Undefined();
    if (planValue.IsExternal()) {
      const ApplyPlan* plan = planValue.As<Napi::External<ApplyPlan>>().Data();
      if (plan->n != n || plan->k != k || plan->rows > m) {
        Fail(env, where + "its plan is for [" + std::to_string(plan->n) + ", " + std::to_string(plan->k) + "] and " +
                      std::to_string(plan->rows) + " rows, the part is [" + std::to_string(n) + ", " + std::to_string(k) + "] with " +
                      std::to_string(m) + " rows");
        return env.Undefined();
      }
      plans[p] = plan;
    } else if (!planValue.IsUndefined() && !planValue.IsNull()) {
      return Fail(env, where + "plan must come from loraApplyPlan"), env.Undefined();
    }
    parts[p] = MatmulArgs{static_cast<float*>(y), x.data, w, static_cast<WeightDtype>(dtype), m, n, k, k, false};
  }
  // From kSidePrefetchRows rows on, each part runs as its own job: there the matmul items request their tiles'
  // factors ahead, and a job over the whole group's weights asked for the first parts' lines long before their
  // tiles ran (scratch A/B, batch 32 bf16: raw / base ~2 % lower), while the base model's step gained nothing
  // measurable from the group (the engine bench's breakdown: linears and lm_head 23.6 → 23.8 ms).
  if (m >= kSidePrefetchRows) {
    for (int64_t p = 0; p < count; p++) RunGroup(isa, x.data, &parts[p], &plans[p], 1);
  } else {
    RunGroup(isa, x.data, parts.data(), plans.data(), count);
  }
  return env.Undefined();
}

// loraApply(isa, y: [rows, n], x: [rows, k], plan from loraApplyPlan): y += per row tile of a segment,
// shrink → core → expand.
Napi::Value LoraApply(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "loraApply";
  ArrayArg<float> y, x;
  if (!info[3].IsExternal()) {
    Fail(env, "soppu native loraApply: plan must come from loraApplyPlan");
    return env.Undefined();
  }
  const ApplyPlan& plan = *info[3].As<Napi::External<ApplyPlan>>().Data();
  const int64_t n = plan.n, k = plan.k;
  if (!GetF32(info, 1, op, "y", &y) || !GetF32(info, 2, op, "x", &x) || !NeedLength(env, op, "y", y.length, plan.rows * n) ||
      !NeedLength(env, op, "x", x.length, plan.rows * k))
    return env.Undefined();
  RunTiles(plan.disjoint, plan.tiles, plan.firstTile, plan.inlineOnly,
           [&](const Tile& tile) { ApplyTile(isa, plan, tile, x.data, y.data); });
  return env.Undefined();
}

}  // namespace

void RegisterLora(Napi::Env env, Napi::Object exports) {
  exports.Set("loraShrink", Napi::Function::New(env, LoraShrink));
  exports.Set("loraExpand", Napi::Function::New(env, LoraExpand));
  exports.Set("loraCore", Napi::Function::New(env, LoraCore));
  exports.Set("loraApplyPlan", Napi::Function::New(env, LoraApplyPlan));
  exports.Set("loraPlanRows", Napi::Function::New(env, LoraPlanRows));
  exports.Set("loraApply", Napi::Function::New(env, LoraApply));
  exports.Set("matmulGroup", Napi::Function::New(env, MatmulGroup));
}

}  // namespace soppu
