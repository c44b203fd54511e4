// gemmF32 / gemmF64: C[m,n] = alpha · op(A) · op(B) + beta · C, row-major with leading dimensions.
// Blocked (BLIS-style packing into MR/NR panels, K in KC slices) and parallel over tiles of C.
// The micro-kernel comes in three ISA variants (gemm-isa.inc); packing and edges are shared code.
// GCC 12 flags its own AVX-512 intrinsics (the _mm512_undefined_* self-initialisation) as
// uninitialised once they are inlined into target-attributed functions; silence that false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common.h"
#include "simd-common.h"
#include <immintrin.h>
#include <algorithm>
#include <string>
#include <vector>

namespace soppu {

template <class T>
struct GemmKernel {
  int mr, nr;
  void (*micro)(int64_t kc, const T* pa, const T* pb, T* tile);
};

namespace scalar {
#define SOPPU_ISA_LEVEL 0
#define SOPPU_TARGET
#include "simd-isa.inc"
#include "gemm-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace scalar

namespace avx2 {
#define SOPPU_ISA_LEVEL 1
#define SOPPU_TARGET __attribute__((target("avx2,fma,f16c")))
#include "simd-isa.inc"
#include "gemm-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace avx2

namespace avx512 {
#define SOPPU_ISA_LEVEL 2
#define SOPPU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#include "simd-isa.inc"
#include "gemm-isa.inc"
#undef SOPPU_ISA_LEVEL
#undef SOPPU_TARGET
#undef SOPPU_INLINE
}  // namespace avx512

namespace {

template <class T>
GemmKernel<T> KernelFor(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return avx512::GemmKernelOf<T>();
    case Isa::Avx2: return avx2::GemmKernelOf<T>();
    case Isa::Scalar: break;
  }
  return scalar::GemmKernelOf<T>();
}

constexpr int64_t kKc = 256;  // K slice: an MR×KC panel of A and KC×NR of B stay in L1/L2

template <class T>
struct GemmArgs {
  bool transA, transB;
  int64_t m, n, k;
  T alpha;
  const T* a; int64_t lda;
  const T* b; int64_t ldb;
  T beta;
  T* c; int64_t ldc;
};

// op(A)[i0:i0+rows, p0:p0+kc] → panels of MR rows: dst[panel][p][r], zero-padded to MR.
template <class T>
void PackA(const GemmArgs<T>& g, int mr, int64_t i0, int64_t rows, int64_t p0, int64_t kc, T* dst) {
  for (int64_t panel = 0; panel < rows; panel += mr) {
    const int64_t valid = std::min<int64_t>(mr, rows - panel);
    for (int64_t p = 0; p < kc; p++) {
      T* out = dst + panel * kc + p * mr;
      for (int64_t r = 0; r < valid; r++) {
        const int64_t i = i0 + panel + r, kk = p0 + p;
        out[r] = g.transA ? g.a[kk * g.lda + i] : g.a[i * g.lda + kk];
      }
      for (int64_t r = valid; r < mr; r++) out[r] = T(0);
    }
  }
}

// op(B)[p0:p0+kc, j0:j0+cols] → panels of NR columns: dst[panel][p][c], zero-padded to NR.
template <class T>
void PackB(const GemmArgs<T>& g, int nr, int64_t j0, int64_t cols, int64_t p0, int64_t kc, T* dst) {
  for (int64_t panel = 0; panel < cols; panel += nr) {
    const int64_t valid = std::min<int64_t>(nr, cols - panel);
    for (int64_t p = 0; p < kc; p++) {
      T* out = dst + panel * kc + p * nr;
      const int64_t kk = p0 + p;
      if (g.transB) {
        for (int64_t c = 0; c < valid; c++) out[c] = g.b[(j0 + panel + c) * g.ldb + kk];
      } else {
        const T* row = g.b + kk * g.ldb + j0 + panel;
        for (int64_t c = 0; c < valid; c++) out[c] = row[c];
      }
      for (int64_t c = valid; c < nr; c++) out[c] = T(0);
    }
  }
}

template <class T>
void Gemm(Isa isa, const GemmArgs<T>& g) {
  if (g.m <= 0 || g.n <= 0) return;
  if (g.k == 0) {  // op(A)·op(B) is zero: C = beta·C (not read when beta = 0)
    for (int64_t i = 0; i < g.m; i++)
      for (int64_t j = 0; j < g.n; j++) {
        T& out = g.c[i * g.ldc + j];
        out = g.beta == T(0) ? T(0) : g.beta * out;
      }
    return;
  }
  const GemmKernel<T> kernel = KernelFor<T>(isa);
  const int64_t mc = kernel.mr * 16, nc = kernel.nr * 8;
  const int64_t rowTiles = (g.m + mc - 1) / mc, colTiles = (g.n + nc - 1) / nc;
  // A task is one mc×nc tile of C; it packs its own panels (B is re-packed per row tile: 1/mc extra).
  const int64_t flopsPerTile = std::min(mc, g.m) * std::min(nc, g.n) * g.k;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, flopsPerTile));
  ParallelFor(rowTiles * colTiles, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> packedA, packedB;
    packedA.resize(static_cast<size_t>(mc * kKc));
    packedB.resize(static_cast<size_t>(nc * kKc));
    T tile[16 * 64];  // ≥ MR × NR of every variant
    for (int64_t t = begin; t < end; t++) {
      const int64_t i0 = (t / colTiles) * mc, j0 = (t % colTiles) * nc;
      const int64_t rows = std::min(mc, g.m - i0), cols = std::min(nc, g.n - j0);
      for (int64_t p0 = 0; p0 < g.k; p0 += kKc) {
        const int64_t kc = std::min(kKc, g.k - p0);
        PackA(g, kernel.mr, i0, rows, p0, kc, packedA.data());
        PackB(g, kernel.nr, j0, cols, p0, kc, packedB.data());
        const bool first = p0 == 0;
        for (int64_t jp = 0; jp < cols; jp += kernel.nr) {
          const int64_t validCols = std::min<int64_t>(kernel.nr, cols - jp);
          for (int64_t ip = 0; ip < rows; ip += kernel.mr) {
            const int64_t validRows = std::min<int64_t>(kernel.mr, rows - ip);
            kernel.micro(kc, packedA.data() + ip * kc, packedB.data() + jp * kc, tile);
            for (int64_t r = 0; r < validRows; r++) {
              T* out = g.c + (i0 + ip + r) * g.ldc + j0 + jp;
              const T* acc = tile + r * kernel.nr;
              if (!first) {
                for (int64_t c = 0; c < validCols; c++) out[c] += g.alpha * acc[c];
              } else if (g.beta == T(0)) {
                for (int64_t c = 0; c < validCols; c++) out[c] = g.alpha * acc[c];
              } else {
                for (int64_t c = 0; c < validCols; c++) out[c] = g.alpha * acc[c] + g.beta * out[c];
              }
            }
          }
        }
      }
    }
  });
}

bool Fail(const Napi::Env& env, const std::string& message) {
  Napi::RangeError::New(env, "soppu native: " + message).ThrowAsJavaScriptException();
  return false;
}

bool GetInt(const Napi::Value& v, const char* name, int64_t& out) {
  if (!v.IsNumber()) return Fail(v.Env(), std::string(name) + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  // below 2^31, as every size the kernels take: Extent's products then fit int64
  if (!(d >= 0) || d >= 2147483648.0 || d != static_cast<double>(static_cast<int64_t>(d)))
    return Fail(v.Env(), std::string(name) + " must be a non-negative integer below 2^31");
  out = static_cast<int64_t>(d);
  return true;
}

// Smallest element count a row-major operand of `rows` × `cols` with leading dimension ld needs.
int64_t Extent(int64_t rows, int64_t cols, int64_t ld) { return rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols; }

// gemmF32/gemmF64(isa, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
template <class T, napi_typedarray_type kArrayType>
Napi::Value GemmJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* name = kArrayType == napi_float32_array ? "gemmF32" : "gemmF64";
  if (info.Length() < 14 || !info[7].IsTypedArray() || !info[9].IsTypedArray() || !info[12].IsTypedArray()) {
    Fail(env, std::string(name) + "(isa, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): bad arguments");
    return env.Undefined();
  }
  GemmArgs<T> g;
  g.transA = info[1].ToBoolean().Value();
  g.transB = info[2].ToBoolean().Value();
  if (!GetInt(info[3], "m", g.m) || !GetInt(info[4], "n", g.n) || !GetInt(info[5], "k", g.k) ||
      !GetInt(info[8], "lda", g.lda) || !GetInt(info[10], "ldb", g.ldb) || !GetInt(info[13], "ldc", g.ldc))
    return env.Undefined();
  if (!info[6].IsNumber() || !info[11].IsNumber()) {
    Fail(env, std::string(name) + ": alpha and beta must be numbers");
    return env.Undefined();
  }
  g.alpha = static_cast<T>(info[6].As<Napi::Number>().DoubleValue());
  g.beta = static_cast<T>(info[11].As<Napi::Number>().DoubleValue());
  Napi::TypedArray a = info[7].As<Napi::TypedArray>(), b = info[9].As<Napi::TypedArray>(), c = info[12].As<Napi::TypedArray>();
  if (a.TypedArrayType() != kArrayType || b.TypedArrayType() != kArrayType || c.TypedArrayType() != kArrayType) {
    Fail(env, std::string(name) + ": a, b and c must all be " + (kArrayType == napi_float32_array ? "Float32Array" : "Float64Array"));
    return env.Undefined();
  }
  const int64_t aRows = g.transA ? g.k : g.m, aCols = g.transA ? g.m : g.k;
  const int64_t bRows = g.transB ? g.n : g.k, bCols = g.transB ? g.k : g.n;
  if (g.lda < aCols || g.ldb < bCols || g.ldc < g.n ||
      static_cast<int64_t>(a.ElementLength()) < Extent(aRows, aCols, g.lda) ||
      static_cast<int64_t>(b.ElementLength()) < Extent(bRows, bCols, g.ldb) ||
      static_cast<int64_t>(c.ElementLength()) < Extent(g.m, g.n, g.ldc)) {
    Fail(env, std::string(name) + ": leading dimension or array length too small for m=" + std::to_string(g.m) +
                  " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k));
    return env.Undefined();
  }
  g.a = a.As<Napi::TypedArrayOf<T>>().Data();
  g.b = b.As<Napi::TypedArrayOf<T>>().Data();
  g.c = c.As<Napi::TypedArrayOf<T>>().Data();
  Gemm<T>(isa, g);
  return env.Undefined();
}

}  // namespace

void RegisterGemm(Napi::Env env, Napi::Object exports) {
  exports.Set("gemmF32", Napi::Function::New(env, GemmJs<float, napi_float32_array>));
  exports.Set("gemmF64", Napi::Function::New(env, GemmJs<double, napi_float64_array>));
}

}  // namespace soppu
