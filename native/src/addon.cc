#include "common.h"

namespace soppu {
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  RegisterCpu(env, exports);
  RegisterMatmul(env, exports);
  RegisterGemm(env, exports);
  RegisterOps(env, exports);
  RegisterAttention(env, exports);
  RegisterLora(env, exports);
  RegisterLargePages(env, exports);
  return exports;
}
}  // namespace soppu

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return soppu::Init(env, exports); }

NODE_API_MODULE(soppu_native, InitAddon)
