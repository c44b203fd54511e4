#include "common.h"

namespace soppu {
void RegisterLora(Napi::Env, Napi::Object) {}
}  // namespace soppu
