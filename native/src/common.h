// Shared declarations of the SOPPU native addon.
// Every exported op takes the ISA variant index as its first JS argument, so kernel sets for
// different variants can live side by side in one process (tests compare each to the reference).
#pragma once
#include <napi.h>
#include <cstdint>
#include <functional>
#include <thread>

namespace soppu {

// ISA variants, best last. Room is left for bf16 paths (AVX512-BF16, AMX) in later issues.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kIsaCount = 3;

const char* IsaName(Isa isa);
bool IsaSupported(Isa isa);   // CPU (and OS) support, from cpuid/xgetbv
Isa BestIsa();                // highest supported, or SOPPU_KERNEL_VARIANT when set and supported
Isa IsaFromArg(const Napi::Value& v);  // validates a JS ISA index; throws a JS error if unsupported

// Persistent thread pool (threads default to the core count; SOPPU_THREADS sets it).
int NumThreads();
// Runs fn(begin, end) over [0, n) split into chunks of at least `grain`, on the pool; blocks until done.
void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
// Runs fn(i) for i in [0, n) on the pool, each index claimed on its own and in order; blocks until done.
void ParallelForEach(int64_t n, const std::function<void(int64_t)>& fn);

// Waits until done() holds: polls with a pause between reads (a tight loop slows an SMT sibling doing
// the work), then yields the CPU, as the thread that will make it true may have been preempted.
template <typename Done>
inline void SpinUntil(Done done) {
  constexpr int kSpins = 2000;  // pause iterations before yielding
  for (int spins = 0; !done(); spins++) {
    if (spins < kSpins) __builtin_ia32_pause();
    else std::this_thread::yield();
  }
}

// Registration hooks, one per source file.
void RegisterCpu(Napi::Env env, Napi::Object exports);
void RegisterMatmul(Napi::Env env, Napi::Object exports);
void RegisterGemm(Napi::Env env, Napi::Object exports);
void RegisterOps(Napi::Env env, Napi::Object exports);
void RegisterAttention(Napi::Env env, Napi::Object exports);
void RegisterLora(Napi::Env env, Napi::Object exports);
void RegisterLargePages(Napi::Env env, Napi::Object exports);

}  // namespace soppu
