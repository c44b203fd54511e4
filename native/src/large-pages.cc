// largePageBuffer: memory for long-lived weights, on 2 MiB transparent huge pages where the kernel allows.
// A decode step reads every weight once: on 4 KiB pages that is a page walk per 4 KiB (~66k a SmolLM-135M step
// in bf16), and at batch 32 the LoRA factors' short reads each touch a few more pages than the TLB holds.
// Anonymous memory is mapped 2 MiB-aligned and advised MADV_HUGEPAGE before anything touches it, so the
// first write faults in huge pages (with transparent_hugepage "madvise", the common default, nothing else
// would). The ArrayBuffer owns the mapping: its finalizer unmaps it.
#include "common.h"
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace soppu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// The largest external ArrayBuffer Node 20 makes: napi builds it as a Buffer, and past Buffer's 4 GiB limit that
// fails after running the finalizer, which node-addon-api then frees a second time (the process aborts).
constexpr double kMaxBytes = 4294967296.0;

// largePageBuffer(bytes) → an ArrayBuffer of `bytes` zero bytes (1 to 4 GiB), or undefined where no such mapping
// is made (not Linux, or mmap failed): the caller then uses a plain ArrayBuffer.
Napi::Value LargePageBuffer(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "soppu native largePageBuffer: bytes must be a number").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  const double requested = info[0].As<Napi::Number>().DoubleValue();
  if (!(requested >= 1 && requested <= kMaxBytes) || requested != static_cast<double>(static_cast<int64_t>(requested))) {
    Napi::RangeError::New(env, "soppu native largePageBuffer: bytes must be a whole number from 1 to 4 GiB (4294967296)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(requested);
  const long pageSize = sysconf(_SC_PAGESIZE);
  const size_t page = pageSize > 0 ? static_cast<size_t>(pageSize) : 4096;
  const size_t size = (bytes + page - 1) / page * page;
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
  napi_value buffer;
  const napi_finalize unmap = [](napi_env, void* mapped, void* mappedSize) {
    munmap(mapped, *static_cast<size_t*>(mappedSize));
    delete static_cast<size_t*>(mappedSize);
  };
  // raw napi, not Napi::ArrayBuffer::New: on a refusal Node may already have run the finalizer, which the wrapper
  // would then free again; here a refusal frees nothing (at worst the mapping leaks) and the caller falls back
  if (napi_create_external_arraybuffer(env, data, bytes, unmap, new size_t(size), &buffer) != napi_ok) return env.Undefined();
  return Napi::Value(env, buffer);
#else
  return env.Undefined();
#endif
}

}  // namespace

void RegisterLargePages(Napi::Env env, Napi::Object exports) {
  exports.Set("largePageBuffer", Napi::Function::New(env, LargePageBuffer));
}

}  // namespace soppu
