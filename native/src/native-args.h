// Argument reading, checking and ISA dispatch shared by ops.cc, attention.cc and lora.cc.
// Every check throws a JS TypeError/RangeError naming the op, the argument and the limit, so native
// code never reads or writes outside the arrays it was given (TS validates first; this is the backstop).
#pragma once
#include <initializer_list>
#include "common.h"
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized and -Wuninitialized on their own
// _mm512_undefined_* pass-through (a known false positive, e.g. inside _mm512_reduce_add_ps); silence
// them for the files that include this header, as matmul.cc and gemm.cc do.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <string>

// A region whose functions are compiled for one ISA (per-function target attributes; no global flags).
#if defined(__clang__)
#define SOPPU_BEGIN_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define SOPPU_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c\"))), apply_to = function)")
#define SOPPU_END_ISA _Pragma("clang attribute pop")
#else
#define SOPPU_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SOPPU_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c\")")
#define SOPPU_END_ISA _Pragma("GCC pop_options")
#endif

// Calls `call` in namespace scalar, avx2 or avx512 by the variant.
#define SOPPU_DISPATCH(isa, call)          \
  switch (isa) {                           \
    case ::soppu::Isa::Avx512: avx512::call; break; \
    case ::soppu::Isa::Avx2: avx2::call; break;     \
    default: scalar::call; break;          \
  }

namespace soppu {

template <typename T>
struct ArrayArg {
  T* data = nullptr;
  int64_t length = 0;
};

inline bool Fail(const Napi::Env& env, const std::string& message) {
  Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
  return false;
}

/** Argument `index` as a typed array of the given type; fails (JS TypeError) naming op and argument. */
template <typename T>
inline bool GetArray(const Napi::CallbackInfo& info, size_t index, napi_typedarray_type expected, const char* op,
                     const char* name, ArrayArg<T>* out) {
  const Napi::Value value = info[index];
  napi_typedarray_type type;
  size_t length = 0;
  void* data = nullptr;
  if (!value.IsTypedArray() ||
      napi_get_typedarray_info(info.Env(), value, &type, &length, &data, nullptr, nullptr) != napi_ok ||
      type != expected) {
    Napi::TypeError::New(info.Env(), std::string("soppu native ") + op + ": " + name + " has the wrong array type")
        .ThrowAsJavaScriptException();
    return false;
  }
  out->data = static_cast<T*>(data);
  out->length = static_cast<int64_t>(length);
  return true;
}

inline bool GetF32(const Napi::CallbackInfo& info, size_t index, const char* op, const char* name, ArrayArg<float>* out) {
  return GetArray(info, index, napi_float32_array, op, name, out);
}
inline bool GetI32(const Napi::CallbackInfo& info, size_t index, const char* op, const char* name, ArrayArg<int32_t>* out) {
  return GetArray(info, index, napi_int32_array, op, name, out);
}

/**
 * `value` as an integer in [minimum, 2^31); fails with what() (built only then: this runs per call) + the limits.
 * For values that are not a call's own arguments (an element of an array argument); GetInt for those.
 */
template <typename What>
inline bool IntValue(const Napi::Env& env, const Napi::Value& value, int64_t minimum, int64_t* out, What what) {
  const double number = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : NAN;
  if (!(number >= static_cast<double>(minimum) && number < 2147483648.0 && number == std::floor(number)))
    return Fail(env, what() + " must be an integer >= " + std::to_string(minimum) + " and < 2^31");
  *out = static_cast<int64_t>(number);
  return true;
}

/** Argument `index` as an integer in [minimum, 2^31); fails naming op and argument. */
inline bool GetInt(const Napi::CallbackInfo& info, size_t index, const char* op, const char* name, int64_t minimum,
                   int64_t* out) {
  return IntValue(info.Env(), info[index], minimum, out, [&] { return std::string("soppu native ") + op + ": " + name; });
}

inline bool GetNumber(const Napi::CallbackInfo& info, size_t index, const char* op, const char* name, double* out) {
  const Napi::Value value = info[index];
  if (!value.IsNumber()) return Fail(info.Env(), std::string("soppu native ") + op + ": " + name + " must be a number");
  *out = value.As<Napi::Number>().DoubleValue();
  return true;
}

/** The product of `factors` in *out, or fails naming op and `what` when it overflows int64 (sizes < 2^31 each). */
inline bool CheckedProduct(const Napi::Env& env, const char* op, const char* what, std::initializer_list<int64_t> factors, int64_t* out) {
  int64_t product = 1;
  for (const int64_t factor : factors)
    if (__builtin_mul_overflow(product, factor, &product))
      return Fail(env, std::string("soppu native ") + op + ": " + what + " overflows 64-bit sizes");
  *out = product;
  return true;
}

/** Fails unless `length` ≥ `needed`, naming op, argument and both sizes. */
inline bool NeedLength(const Napi::Env& env, const char* op, const char* name, int64_t length, int64_t needed) {
  if (length >= needed) return true;
  return Fail(env, std::string("soppu native ") + op + ": " + name + " has " + std::to_string(length) +
                       " elements, needs " + std::to_string(needed));
}

}  // namespace soppu
