// Native element-wise and row-wise ops (rmsnorm, rope, softmax, siluMul, add, addBias, embedding),
// each in scalar / AVX2 / AVX-512 variants. Contracts: src/kernels/kernel-set.ts; spec: src/kernels/ref.
#include "native-args.h"
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace soppu {
namespace scalar {
#define SOPPU_ISA 0
#include "simd.inc"
#include "ops-kernels.inc"
#undef SOPPU_ISA
}  // namespace scalar
}  // namespace soppu

SOPPU_BEGIN_AVX2
namespace soppu {
namespace avx2 {
#define SOPPU_ISA 1
#include "simd.inc"
#include "ops-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx2
}  // namespace soppu
SOPPU_END_ISA

SOPPU_BEGIN_AVX512
namespace soppu {
namespace avx512 {
#define SOPPU_ISA 2
#include "simd.inc"
#include "ops-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx512
}  // namespace soppu
SOPPU_END_ISA

namespace soppu {
namespace {

constexpr int64_t kElementGrain = 1 << 14;  // elements per parallel chunk for streaming ops

int64_t RowGrain(int64_t cols) { return cols >= kElementGrain ? 1 : kElementGrain / (cols > 0 ? cols : 1); }

// rmsnorm(isa, out, x, weight, rows, dim, eps)
Napi::Value Rmsnorm(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> out, x, weight;
  int64_t rows, dim;
  double eps;
  const char* op = "rmsnorm";
  if (!GetF32(info, 1, op, "out", &out) || !GetF32(info, 2, op, "x", &x) || !GetF32(info, 3, op, "weight", &weight) ||
      !GetInt(info, 4, op, "rows", 0, &rows) || !GetInt(info, 5, op, "dim", 1, &dim) ||
      !GetNumber(info, 6, op, "eps", &eps) || !NeedLength(env, op, "out", out.length, rows * dim) ||
      !NeedLength(env, op, "x", x.length, rows * dim) || !NeedLength(env, op, "weight", weight.length, dim))
    return env.Undefined();
  ParallelFor(rows, RowGrain(dim), [&](int64_t begin, int64_t end) {
    SOPPU_DISPATCH(isa, RmsnormRows(out.data, x.data, weight.data, begin, end, dim, eps));
  });
  return env.Undefined();
}

// cos and sin of position · invFreq[i] (f64, rounded to f32, as the reference computes them) for positions
// 0 … kept − 1 of the last invFreq seen, kept between calls: a step calls rope twice per layer with the same
// positions, and computing them in every call was most of rope's time (batch 32: ~1 ms of a SmolLM step).
// A position outside the table (negative, or past kMaxBytes of it) gets its row computed for that call.
class RopeAngles {
 public:
  std::vector<const float*> cosines, sines;  // per token of the last Prepare: its row

  void Prepare(const float* invFreq, int64_t half, const int32_t* positions, int64_t tokens) {
    if (half != half_ || !std::equal(invFreq, invFreq + half, invFreq_.begin())) {
      invFreq_.assign(invFreq, invFreq + half);
      half_ = half;
      kept_ = 0;
    }
    const int64_t limit = std::max<int64_t>(1, kMaxBytes / (8 * half));
    int64_t wanted = kept_, outside = 0;
    for (int64_t t = 0; t < tokens; t++) {
      if (positions[t] >= 0 && positions[t] < limit) wanted = std::max<int64_t>(wanted, positions[t] + 1);
      else outside++;
    }
    if (wanted > kept_) {  // grow geometrically, so a sequence that creeps forward fills it in few passes
      const int64_t kept = std::min(limit, std::max(wanted, 2 * kept_));
      table_.resize(static_cast<size_t>(2 * kept * half));
      for (int64_t p = kept_; p < kept; p++) Fill(static_cast<double>(p), table_.data() + 2 * p * half);
      kept_ = kept;
    }
    spill_.resize(static_cast<size_t>(2 * outside * half));
    cosines.resize(static_cast<size_t>(tokens));
    sines.resize(static_cast<size_t>(tokens));
    for (int64_t t = 0, spilled = 0; t < tokens; t++) {
      const int64_t p = positions[t];
      const bool kept = p >= 0 && p < kept_;
      float* row = kept ? table_.data() + 2 * p * half : spill_.data() + 2 * spilled++ * half;
      if (!kept) Fill(static_cast<double>(p), row);
      cosines[static_cast<size_t>(t)] = row;
      sines[static_cast<size_t>(t)] = row + half;
    }
  }

 private:
  static constexpr int64_t kMaxBytes = 8 << 20;
  // row: [cos of the half angles, sin of them]
  void Fill(double position, float* row) const {
    for (int64_t i = 0; i < half_; i++) {
      const double angle = position * static_cast<double>(invFreq_[static_cast<size_t>(i)]);
      row[i] = static_cast<float>(std::cos(angle));
      row[half_ + i] = static_cast<float>(std::sin(angle));
    }
  }
  std::vector<float> invFreq_, table_, spill_;
  int64_t half_ = 0, kept_ = 0;
};

// rope(isa, x, positions, tokens, heads, headDim, invFreq)
Napi::Value Rope(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> x, invFreq;
  ArrayArg<int32_t> positions;
  int64_t tokens, heads, headDim;
  const char* op = "rope";
  if (!GetF32(info, 1, op, "x", &x) || !GetI32(info, 2, op, "positions", &positions) ||
      !GetInt(info, 3, op, "tokens", 0, &tokens) || !GetInt(info, 4, op, "heads", 1, &heads) ||
      !GetInt(info, 5, op, "headDim", 2, &headDim) || !GetF32(info, 6, op, "invFreq", &invFreq))
    return env.Undefined();
  if (headDim % 2 != 0) {
    Fail(env, "soppu native rope: headDim " + std::to_string(headDim) + " must be even");
    return env.Undefined();
  }
  int64_t elements = 0;
  if (!CheckedProduct(env, op, "tokens · heads · headDim", {tokens, heads, headDim}, &elements) ||
      !NeedLength(env, op, "x", x.length, elements) ||
      !NeedLength(env, op, "positions", positions.length, tokens) ||
      !NeedLength(env, op, "invFreq", invFreq.length, headDim / 2))
    return env.Undefined();
  thread_local RopeAngles angles;  // per calling thread
  angles.Prepare(invFreq.data, headDim / 2, positions.data, tokens);
  // the rows by pointer: inside the lambda `angles` would name each pool thread's own (empty) instance
  const float* const* cosines = angles.cosines.data();
  const float* const* sines = angles.sines.data();
  ParallelFor(tokens, RowGrain(heads * headDim), [&](int64_t begin, int64_t end) {
    SOPPU_DISPATCH(isa, RopeTokens(x.data, cosines, sines, begin, end, heads, headDim));
  });
  return env.Undefined();
}

// softmax(isa, x, rows, cols)
Napi::Value Softmax(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> x;
  int64_t rows, cols;
  const char* op = "softmax";
  if (!GetF32(info, 1, op, "x", &x) || !GetInt(info, 2, op, "rows", 0, &rows) || !GetInt(info, 3, op, "cols", 0, &cols) ||
      !NeedLength(env, op, "x", x.length, rows * cols))
    return env.Undefined();
  if (cols == 0) return env.Undefined();
  ParallelFor(rows, RowGrain(cols), [&](int64_t begin, int64_t end) { SOPPU_DISPATCH(isa, SoftmaxRows(x.data, begin, end, cols)); });
  return env.Undefined();
}

// logSumExp(isa, out: Float32Array, x, rows, cols) and argmax(isa, out: Int32Array, x, rows, cols): row
// reductions, the same shape of call
template <bool kArgmax>
Napi::Value RowReduction(const Napi::CallbackInfo& info) {
  using Out = std::conditional_t<kArgmax, int32_t, float>;
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<Out> out;
  ArrayArg<float> x;
  int64_t rows, cols;
  const char* op = kArgmax ? "argmax" : "logSumExp";
  if (!GetArray(info, 1, kArgmax ? napi_int32_array : napi_float32_array, op, "out", &out) || !GetF32(info, 2, op, "x", &x) ||
      !GetInt(info, 3, op, "rows", 0, &rows) || !GetInt(info, 4, op, "cols", 1, &cols) ||
      !NeedLength(env, op, "out", out.length, rows) || !NeedLength(env, op, "x", x.length, rows * cols))
    return env.Undefined();
  ParallelFor(rows, RowGrain(cols), [&](int64_t begin, int64_t end) {
    if constexpr (kArgmax) {
      SOPPU_DISPATCH(isa, ArgmaxRows(out.data, x.data, begin, end, cols));
    } else {
      SOPPU_DISPATCH(isa, LogSumExpRows(out.data, x.data, begin, end, cols));
    }
  });
  return env.Undefined();
}

// siluMul(isa, out, gate, up, n) and add(isa, out, a, b, n): the same shape of call
template <bool kSilu>
Napi::Value Binary(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> out, a, b;
  int64_t n;
  const char* op = kSilu ? "siluMul" : "add";
  if (!GetF32(info, 1, op, "out", &out) || !GetF32(info, 2, op, kSilu ? "gate" : "a", &a) ||
      !GetF32(info, 3, op, kSilu ? "up" : "b", &b) || !GetInt(info, 4, op, "n", 0, &n) ||
      !NeedLength(env, op, "out", out.length, n) || !NeedLength(env, op, kSilu ? "gate" : "a", a.length, n) ||
      !NeedLength(env, op, kSilu ? "up" : "b", b.length, n))
    return env.Undefined();
  ParallelFor(n, kElementGrain, [&](int64_t begin, int64_t end) {
    if (kSilu) {
      SOPPU_DISPATCH(isa, SiluMulVectors(out.data + begin, a.data + begin, b.data + begin, end - begin));
    } else {
      SOPPU_DISPATCH(isa, AddVectors(out.data + begin, a.data + begin, b.data + begin, end - begin));
    }
  });
  return env.Undefined();
}

// addBias(isa, y, bias, rows, cols)
Napi::Value AddBias(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> y, bias;
  int64_t rows, cols;
  const char* op = "addBias";
  if (!GetF32(info, 1, op, "y", &y) || !GetF32(info, 2, op, "bias", &bias) || !GetInt(info, 3, op, "rows", 0, &rows) ||
      !GetInt(info, 4, op, "cols", 0, &cols) || !NeedLength(env, op, "y", y.length, rows * cols) ||
      !NeedLength(env, op, "bias", bias.length, cols))
    return env.Undefined();
  ParallelFor(rows, RowGrain(cols), [&](int64_t begin, int64_t end) { SOPPU_DISPATCH(isa, AddBiasRows(y.data, bias.data, begin, end, cols)); });
  return env.Undefined();
}

// embedding(isa, out, tableData, dtype (0 f32, 1 bf16, 2 f16), vocab, dim, ids, tokens)
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  ArrayArg<float> out, tableF32;
  ArrayArg<uint16_t> table16;
  ArrayArg<int32_t> ids;
  int64_t dtype, vocab, dim, tokens;
  const char* op = "embedding";
  if (!GetF32(info, 1, op, "out", &out) || !GetInt(info, 3, op, "dtype", 0, &dtype) ||
      !GetInt(info, 4, op, "vocab", 0, &vocab) || !GetInt(info, 5, op, "dim", 0, &dim) ||
      !GetI32(info, 6, op, "ids", &ids) || !GetInt(info, 7, op, "tokens", 0, &tokens))
    return env.Undefined();
  if (dtype > 2) {
    Fail(env, "soppu native embedding: dtype code " + std::to_string(dtype) + " is not 0 (f32), 1 (bf16) or 2 (f16)");
    return env.Undefined();
  }
  const void* table = nullptr;
  int64_t tableLength = 0;
  if (dtype == 0) {
    if (!GetF32(info, 2, op, "table", &tableF32)) return env.Undefined();
    table = tableF32.data;
    tableLength = tableF32.length;
  } else {
    if (!GetArray(info, 2, napi_uint16_array, op, "table", &table16)) return env.Undefined();
    table = table16.data;
    tableLength = table16.length;
  }
  if (!NeedLength(env, op, "table", tableLength, vocab * dim) || !NeedLength(env, op, "out", out.length, tokens * dim) ||
      !NeedLength(env, op, "ids", ids.length, tokens))
    return env.Undefined();
  for (int64_t t = 0; t < tokens; t++) {
    if (ids.data[t] < 0 || ids.data[t] >= vocab) {
      Fail(env, "soppu native embedding: token id " + std::to_string(ids.data[t]) + " at position " + std::to_string(t) +
                    " is outside the vocabulary of " + std::to_string(vocab));
      return env.Undefined();
    }
  }
  ParallelFor(tokens, RowGrain(dim), [&](int64_t begin, int64_t end) {
    SOPPU_DISPATCH(isa, EmbeddingTokens(out.data, table, static_cast<int>(dtype), dim, ids.data, begin, end));
  });
  return env.Undefined();
}

}  // namespace

void RegisterOps(Napi::Env env, Napi::Object exports) {
  exports.Set("rmsnorm", Napi::Function::New(env, Rmsnorm));
  exports.Set("rope", Napi::Function::New(env, Rope));
  exports.Set("softmax", Napi::Function::New(env, Softmax));
  exports.Set("logSumExp", Napi::Function::New(env, RowReduction<false>));
  exports.Set("argmax", Napi::Function::New(env, RowReduction<true>));
  exports.Set("siluMul", Napi::Function::New(env, Binary<true>));
  exports.Set("add", Napi::Function::New(env, Binary<false>));
  exports.Set("addBias", Napi::Function::New(env, AddBias));
  exports.Set("embedding", Napi::Function::New(env, Embedding));
}

}  // namespace soppu
