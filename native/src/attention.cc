#include "common.h"

namespace soppu {
void RegisterAttention(Napi::Env, Napi::Object) {}
}  // namespace soppu
