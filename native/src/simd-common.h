// Types and scalar conversions shared by the per-ISA kernel bodies (simd-isa.inc and friends).
#pragma once
#include <cstdint>
#include <cstring>

namespace soppu {

// 16-bit weight storage, kept as raw bits; distinct types so templates can dispatch on them.
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// Weight dtype codes passed from JS (src/kernels/native-core-ops.ts keeps the same table).
enum class WeightDtype : int { F32 = 0, Bf16 = 1, F16 = 2 };

inline float BitsToFloat(uint32_t bits) { float f; std::memcpy(&f, &bits, 4); return f; }

inline float WeightToFloat(float w) { return w; }
inline float WeightToFloat(Bf16 w) { return BitsToFloat(static_cast<uint32_t>(w.bits) << 16); }
// IEEE half → float without F16C (the scalar variant); subnormals, inf and NaN included.
inline float WeightToFloat(F16 w) {
  const uint32_t sign = static_cast<uint32_t>(w.bits & 0x8000u) << 16;
  uint32_t exponent = (w.bits >> 10) & 0x1fu;
  uint32_t mantissa = w.bits & 0x3ffu;
  if (exponent == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    // normalise the subnormal: shift until the implicit bit appears
    exponent = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) { mantissa <<= 1; exponent--; }
    mantissa &= 0x3ffu;
    return BitsToFloat(sign | (exponent << 23) | (mantissa << 13));
  }
  return BitsToFloat(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

}  // namespace soppu
