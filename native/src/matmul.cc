// matmul: y[M,N] = x[M,K] · W[N,K]ᵀ (or +=), W in f32, bf16 or f16, converted in registers.
// Three ISA variants of the same kernel live side by side (matmul-isa.inc, included per variant).
// GCC 12 flags its own AVX-512 intrinsics (the _mm512_undefined_* self-initialisation) as
// uninitialised once they are inlined into target-attributed functions; silence that false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "matmul.h"
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <utility>
#include <vector>

namespace soppu {

namespace scalar {
#define SOPPU_ISA_LEVEL 0
#define SOPPU_TARGET
#include "simd-isa.inc"
#include "matmul-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace scalar

namespace avx2 {
#define SOPPU_ISA_LEVEL 1
#define SOPPU_TARGET __attribute__((target("avx2,fma,f16c")))
#include "simd-isa.inc"
#include "matmul-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace avx2

namespace avx512 {
#define SOPPU_ISA_LEVEL 2
#define SOPPU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#include "simd-isa.inc"
#include "matmul-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace avx512

namespace {

using BlockFn = void (*)(const MatmulArgs&, int64_t, int64_t, int64_t, int64_t, LinePrefetcher*);
using SumFn = double (*)(const float*, int64_t);

// Indexed by Isa. A later AVX512-BF16 / AMX variant adds a row here (and an Isa value in common.h).
constexpr BlockFn kBlockFns[kIsaCount] = {&scalar::MatmulBlockAny, &avx2::MatmulBlockAny, &avx512::MatmulBlockAny};
constexpr SumFn kSumFns[kIsaCount] = {&scalar::SumRange, &avx2::SumRange, &avx512::SumRange};

constexpr int64_t kRowBlock = 64;   // rows of x per task when M is large (x block stays in L2)
constexpr int64_t kColumnUnit = 24; // rows of W per scheduling unit (a multiple of every NR)
constexpr int64_t kMinMacsPerChunk = 1 << 16;
// Up to this many rows of x, a matmul is bound by its one pass over W, and each thread takes one
// contiguous part of W: every part's start is a cold stream (the hardware prefetcher relearns it, and the
// row-order kernel's requests run past the part's end into rows another thread reads), so about four
// parts per thread, as ParallelFor splits, read slower. Step sequence of SmolLM-135M's 211 matmuls
// (scratch, one process per variant, rounds classed by a read probe): bf16 at ~72 GB/s M = 1
// 4.77–4.92 → 4.36–4.42 ms, M = 2 5.64–5.67 → 5.17–5.39 ms, M = 4 5.95 → 5.41–5.45 ms, M = 16
// 14.3–14.5 → 13.4–13.6 ms; at M = 32 the two were within noise.
constexpr int64_t kStreamRows = 16;

// K slice per pass, measured per shape on Zen 5 (best of 10, µs at M = 8 / 32, whole K against two
// slices): f32 K 1536 95 / 216 against 87 / 203 (768), f32 K 2048 438 / 1094 against 440 / 974 (1024);
// but f32 K 4096 1677 / 4042 against 1860 / 4621 (2048), and every bf16 shape up to K 4096 ran
// fastest whole (the per-slice reductions cost more than they save). So only mid-length f32 rows are
// halved, and K is sliced only when very long. Few rows of x stream W once anyway: never split.
int64_t KBlock(int64_t m, int64_t k, WeightDtype dtype) {
  if (m <= 4) return k;
  if (k > 4096) return 2048;
  if (dtype == WeightDtype::F32 && k > 1024 && k <= 2048) return ((k + 1) / 2 + 15) / 16 * 16;
  return k;
}

}  // namespace

void MatmulParts(Isa isa, const MatmulArgs* parts, int64_t count, const MatmulFusion* fusion) {
  // Part p covers tasks [first[p], first[p] + rowBlocks · units[p]): its row blocks × column units, as one
  // matmul's. The binding checks count; the guard keeps the arrays in bounds.
  std::array<MatmulArgs, kMaxMatmulParts> a;
  std::array<int64_t, kMaxMatmulParts> units{}, first{};
  count = std::min(count, kMaxMatmulParts);
  const int64_t m = count > 0 ? parts[0].m : 0, k = count > 0 ? parts[0].k : 0;
  const int64_t rowBlocks = (m + kRowBlock - 1) / kRowBlock;
  const int64_t rowsPerBlock = m > 0 ? (m + rowBlocks - 1) / rowBlocks : 0;
  int64_t matmulTasks = 0;
  for (int64_t p = 0; p < count; p++) {
    a[p] = parts[p];
    a[p].kBlock = KBlock(m, k, a[p].dtype);
    if (m > 0 && a[p].n > 0 && k == 0 && !a[p].accumulate) std::fill(a[p].y, a[p].y + m * a[p].n, 0.0f);
    units[p] = m > 0 && k > 0 ? (a[p].n + kColumnUnit - 1) / kColumnUnit : 0;
    first[p] = matmulTasks;
    matmulTasks += rowBlocks * units[p];
  }
  if (matmulTasks == 0) {
    if (fusion) {
      for (int64_t t = 0; t < fusion->tasks; t++) fusion->run(t);
      for (int64_t t = 0; t < fusion->finalTasks; t++) fusion->runFinal(t);
    }
    return;
  }
  const BlockFn block = kBlockFns[static_cast<int>(isa)];
  const int64_t macsPerUnit = rowsPerBlock * kColumnUnit * k;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerChunk / std::max<int64_t>(1, macsPerUnit));
  // Tasks [begin, end): task first[p] + t of part p covers row block t / units[p] and column unit
  // t % units[p] (consecutive tasks share x): one block call per part and row block.
  const auto runTasks = [&](int64_t begin, int64_t end, LinePrefetcher* side) {
    for (int64_t p = 0; p < count; p++) {
      const int64_t partEnd = std::min(end, first[p] + rowBlocks * units[p]) - first[p];
      for (int64_t task = std::max(begin, first[p]) - first[p]; task < partEnd;) {
        const int64_t rowBlock = task / units[p];
        const int64_t unitEnd = std::min(partEnd, (rowBlock + 1) * units[p]);
        const int64_t m0 = rowBlock * rowsPerBlock, m1 = std::min(m, m0 + rowsPerBlock);
        const int64_t n0 = (task - rowBlock * units[p]) * kColumnUnit;
        const int64_t n1 = std::min(a[p].n, (unitEnd - rowBlock * units[p]) * kColumnUnit);
        block(a[p], m0, m1, n0, n1, side);
        task = unitEnd;
      }
    }
  };
  const int64_t threads = NumThreads();
  const bool streaming = m <= kStreamRows;
  if (!fusion) {
    // a grain of a thread's share makes ParallelFor split into one part per thread
    const int64_t chunk = streaming ? std::max(grain, (matmulTasks + threads - 1) / threads) : grain;
    ParallelFor(matmulTasks, chunk, [&](int64_t begin, int64_t end) { runTasks(begin, end, nullptr); });
    return;
  }
  // Items, claimed one at a time and in order: the matmul's tasks, the fusion's tasks, its final
  // tasks, each in chunks of about a quarter of a thread's share (as ParallelFor splits work). A
  // thread holding a final item knows every earlier item is held by a running thread that does not
  // wait: waiting for them cannot deadlock.
  const auto chunkOf = [&](int64_t tasks, int64_t minimum) { return std::max(minimum, (tasks + threads * 4 - 1) / (threads * 4)); };
  const int64_t matmulChunk = streaming ? std::max(grain, (matmulTasks + threads - 1) / threads) : chunkOf(matmulTasks, grain), taskChunk = chunkOf(fusion->tasks, 1), finalChunk = chunkOf(fusion->finalTasks, 1);
  const int64_t matmulItems = (matmulTasks + matmulChunk - 1) / matmulChunk;
  const int64_t taskItems = (fusion->tasks + taskChunk - 1) / taskChunk;
  const int64_t finalItems = (fusion->finalTasks + finalChunk - 1) / finalChunk;
  std::atomic<int64_t> done{0};  // matmul and task items finished
  ParallelForEach(matmulItems + taskItems + finalItems, [&](int64_t item) {
    if (item < matmulItems) {
      const int64_t begin = item * matmulChunk, end = std::min(matmulTasks, (item + 1) * matmulChunk);
      if (!fusion->prefetch || fusion->prefetchLines == 0) {
        runTasks(begin, end, nullptr);
      } else {
        // item i requests its share of the tasks' memory, in order (the first tasks' first), spread
        // over its tiles (about ⌈rows/4⌉ · 4 per task: the AVX-512 tile is 4 × 6, a task 24 columns)
        const int64_t lines = fusion->prefetchLines;
        LinePrefetcher side(*fusion->prefetch, lines * item / matmulItems, lines * (item + 1) / matmulItems,
                            (end - begin) * ((rowsPerBlock + 3) / 4) * 4);
        runTasks(begin, end, &side);
        side.Flush();
      }
    } else if (item < matmulItems + taskItems) {
      const int64_t i = item - matmulItems;
      for (int64_t t = i * taskChunk; t < std::min(fusion->tasks, (i + 1) * taskChunk); t++) fusion->run(t);
    } else {
      SpinUntil([&] { return done.load(std::memory_order_acquire) == matmulItems + taskItems; });
      const int64_t i = item - matmulItems - taskItems;
      for (int64_t t = i * finalChunk; t < std::min(fusion->finalTasks, (i + 1) * finalChunk); t++) fusion->runFinal(t);
      return;
    }
    done.fetch_add(1, std::memory_order_release);
  });
}

namespace {

bool Fail(const Napi::Env& env, const std::string& message) {
  Napi::RangeError::New(env, "soppu native: " + message).ThrowAsJavaScriptException();
  return false;
}

bool GetInt(const Napi::Value& v, const char* name, int64_t& out) {
  if (!v.IsNumber()) return Fail(v.Env(), std::string(name) + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  // below 2^31, as every size the kernels take: products of two then fit int64
  if (!(d >= 0) || d >= 2147483648.0 || d != static_cast<double>(static_cast<int64_t>(d)))
    return Fail(v.Env(), std::string(name) + " must be a non-negative integer below 2^31");
  out = static_cast<int64_t>(d);
  return true;
}

// matmul(isa, y: Float32Array, x: Float32Array, w: Float32Array|Uint16Array, dtype, m, n, k, accumulate)
Napi::Value MatmulJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  if (info.Length() < 9 || !info[1].IsTypedArray() || !info[2].IsTypedArray() || !info[3].IsTypedArray()) {
    Fail(env, "matmul(isa, y, x, w, dtype, m, n, k, accumulate): bad arguments");
    return env.Undefined();
  }
  int64_t dtype, m, n, k;
  if (!GetInt(info[4], "matmul dtype", dtype) || !GetInt(info[5], "matmul m", m) ||
      !GetInt(info[6], "matmul n", n) || !GetInt(info[7], "matmul k", k))
    return env.Undefined();
  Napi::TypedArray yArray = info[1].As<Napi::TypedArray>(), xArray = info[2].As<Napi::TypedArray>(),
                   wArray = info[3].As<Napi::TypedArray>();
  if (yArray.TypedArrayType() != napi_float32_array || xArray.TypedArrayType() != napi_float32_array) {
    Fail(env, "matmul: y and x must be Float32Array");
    return env.Undefined();
  }
  const napi_typedarray_type wantW = dtype == 0 ? napi_float32_array : napi_uint16_array;
  if (dtype > 2 || wArray.TypedArrayType() != wantW) {
    Fail(env, "matmul: weight dtype code " + std::to_string(dtype) + " does not match the weight array type");
    return env.Undefined();
  }
  if (static_cast<int64_t>(yArray.ElementLength()) < m * n || static_cast<int64_t>(xArray.ElementLength()) < m * k ||
      static_cast<int64_t>(wArray.ElementLength()) < n * k) {
    Fail(env, "matmul: array too short for m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    return env.Undefined();
  }
  MatmulArgs a;
  a.y = yArray.As<Napi::Float32Array>().Data();
  a.x = xArray.As<Napi::Float32Array>().Data();
  a.w = dtype == 0 ? static_cast<const void*>(wArray.As<Napi::Float32Array>().Data())
                   : static_cast<const void*>(wArray.As<Napi::Uint16Array>().Data());
  a.dtype = static_cast<WeightDtype>(dtype);
  a.m = m;
  a.n = n;
  a.k = k;
  a.kBlock = k;
  a.accumulate = info[8].ToBoolean().Value();
  Matmul(isa, a);
  return env.Undefined();
}

// memoryReadSum(isa, data: Float32Array): sums the array on the pool (bandwidth probe).
Napi::Value MemoryReadSumJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  if (info.Length() < 2 || !info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    Fail(env, "memoryReadSum(isa, data: Float32Array): bad arguments");
    return env.Undefined();
  }
  Napi::Float32Array data = info[1].As<Napi::Float32Array>();
  const float* p = data.Data();
  const int64_t n = static_cast<int64_t>(data.ElementLength());
  const SumFn sum = kSumFns[static_cast<int>(isa)];
  constexpr int64_t kChunk = 1 << 16;  // floats per scheduling unit (256 KiB)
  const int64_t units = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(units), 0.0);
  ParallelFor(units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; u++)
      partial[static_cast<size_t>(u)] = sum(p + u * kChunk, std::min(kChunk, n - u * kChunk));
  });
  double total = 0;
  for (double v : partial) total += v;
  return Napi::Number::New(env, total);
}

}  // namespace

void RegisterMatmul(Napi::Env env, Napi::Object exports) {
  exports.Set("matmul", Napi::Function::New(env, MatmulJs));
  exports.Set("memoryReadSum", Napi::Function::New(env, MemoryReadSumJs));
}

}  // namespace soppu
