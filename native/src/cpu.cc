#include "common.h"
#include <cpuid.h>
#include <cstdlib>
#include <cstring>

namespace soppu {
namespace {
uint64_t Xgetbv() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}
bool DetectAvx2() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !fma || !f16c) return false;
  if ((Xgetbv() & 0x6) != 0x6) return false;  // XMM and YMM state enabled by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return b & (1u << 5);
}
bool DetectAvx512() {
  if (!DetectAvx2()) return false;
  if ((Xgetbv() & 0xe6) != 0xe6) return false;  // opmask and ZMM state enabled
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  return f && dq && bw && vl;
}
}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "unknown";
}

bool IsaSupported(Isa isa) {
  static const bool avx2 = DetectAvx2(), avx512 = DetectAvx512();
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return avx2;
    case Isa::Avx512: return avx512;
  }
  return false;
}

Isa BestIsa() {
  if (const char* forced = std::getenv("SOPPU_KERNEL_VARIANT")) {
    for (int i = 0; i < kIsaCount; i++)
      if (std::strcmp(forced, IsaName(static_cast<Isa>(i))) == 0 && IsaSupported(static_cast<Isa>(i)))
        return static_cast<Isa>(i);
  }
  for (int i = kIsaCount - 1; i > 0; i--)
    if (IsaSupported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::Scalar;
}

Isa IsaFromArg(const Napi::Value& v) {
  const int index = v.IsNumber() ? v.As<Napi::Number>().Int32Value() : -1;
  if (index < 0 || index >= kIsaCount || !IsaSupported(static_cast<Isa>(index))) {
    Napi::TypeError::New(v.Env(), "soppu native: unsupported ISA variant index").ThrowAsJavaScriptException();
    return Isa::Scalar;
  }
  return static_cast<Isa>(index);
}

void RegisterCpu(Napi::Env env, Napi::Object exports) {
  exports.Set("variants", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    Napi::Array out = Napi::Array::New(info.Env());
    uint32_t n = 0;
    for (int i = 0; i < kIsaCount; i++) {
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("index", i);
      o.Set("name", IsaName(static_cast<Isa>(i)));
      o.Set("supported", IsaSupported(static_cast<Isa>(i)));
      out.Set(n++, o);
    }
    return out;
  }));
  exports.Set("bestVariant", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<int>(BestIsa()));
  }));
  exports.Set("numThreads", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), NumThreads());
  }));
}
}  // namespace soppu
