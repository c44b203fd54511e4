#include "common.h"

namespace soppu {
void RegisterOps(Napi::Env, Napi::Object) {}
}  // namespace soppu
