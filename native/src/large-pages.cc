// largePageBuffer: memory for long-lived weights, on 2 MiB transparent huge pages where the kernel allows.
// A decode step reads every weight once: on 4 KiB pages that is a page walk per 4 KiB (~75k a SmolLM-135M step
// in bf16), and at batch 32 the LoRA factors' short reads each touch a few more pages than the TLB holds.
// Anonymous memory is mapped 2 MiB-aligned and advised MADV_HUGEPAGE before anything touches it, so the
// first write faults in huge pages (with transparent_hugepage "madvise", the common default, nothing else
// would). The ArrayBuffer owns the mapping: its finalizer unmaps it.
#include "common.h"
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace soppu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

// largePageBuffer(bytes) → an ArrayBuffer of `bytes` zero bytes, or undefined where no such mapping is made
// (not Linux, or mmap failed): the caller then uses a plain ArrayBuffer.
Napi::Value LargePageBuffer(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "soppu native largePageBuffer: bytes must be a number").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  const double requested = info[0].As<Napi::Number>().DoubleValue();
  if (!(requested >= 1 && requested <= 9007199254740991.0) || requested != static_cast<double>(static_cast<int64_t>(requested))) {
    Napi::RangeError::New(env, "soppu native largePageBuffer: bytes must be a whole number from 1 to 2^53 - 1").ThrowAsJavaScriptException();
    return env.Undefined();
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(requested);
  const size_t size = (bytes + 4095) / 4096 * 4096;
  if (size > SIZE_MAX - kHugePage) return env.Undefined();
  // map a huge page more than needed, then unmap the ends so the buffer starts on a 2 MiB boundary
  const size_t span = size + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return env.Undefined();
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHugePage - 1) & ~(kHugePage - 1);
  if (start > base) munmap(raw, start - base);
  const uintptr_t end = start + size, spanEnd = base + span;
  if (spanEnd > end) munmap(reinterpret_cast<void*>(end), spanEnd - end);
  void* data = reinterpret_cast<void*>(start);
  madvise(data, size, MADV_HUGEPAGE);  // advice only: without it the buffer still works, on 4 KiB pages
  return Napi::ArrayBuffer::New(
      env, data, bytes, [](Napi::Env, void* mapped, size_t* mappedSize) {
        munmap(mapped, *mappedSize);
        delete mappedSize;
      },
      new size_t(size));
#else
  return env.Undefined();
#endif
}

}  // namespace

void RegisterLargePages(Napi::Env env, Napi::Object exports) {
  exports.Set("largePageBuffer", Napi::Function::New(env, LargePageBuffer));
}

}  // namespace soppu
