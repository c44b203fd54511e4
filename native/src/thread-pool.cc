// Persistent thread pool behind ParallelFor. Workers spin briefly on a generation counter after each
// job (back-to-back kernel calls in one forward step then dispatch in well under a microsecond), and
// fall asleep on a condition variable when idle so an idle server burns no CPU.
// The calling thread works too, so a pool of T threads starts T - 1 workers.
#include "common.h"
#include <sched.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace soppu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWorkerSpins = 4000;  // pause iterations (~50-100 µs) before a worker sleeps

inline void CpuRelax() { __builtin_ia32_pause(); }

int DefaultThreadCount() {
  if (const char* env = std::getenv("SOPPU_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && value >= 1) return static_cast<int>(std::min<long>(value, kMaxThreads));
    if (*env != '\0') std::fprintf(stderr, "soppu: SOPPU_THREADS=%s is not a positive integer; using the core count\n", env);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

thread_local bool tInsidePool = false;

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : size_(threads) {
    for (int i = 1; i < size_; i++) workers_.emplace_back([this] { WorkerLoop(); });
  }

  int size() const { return size_; }

  void Run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> callLock(callMutex_);  // one job at a time, whatever the caller
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    next_.store(0, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);  // publishes the fields above
    {
      // Bumping under the mutex means a worker checking the predicate cannot miss the wakeup.
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    tInsidePool = true;
    RunChunks();
    tInsidePool = false;
    // Every chunk is claimed. Close the job, then wait only for workers that joined it: a worker
    // the OS has not scheduled yet does not hold the caller up (it sees the job closed and leaves).
    open_.store(false, std::memory_order_seq_cst);
    SpinUntil([this] { return active_.load(std::memory_order_seq_cst) == 0; });
  }

 private:
  void RunChunks() {
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= n_) return;
      (*fn_)(begin, std::min(n_, begin + chunk_));
    }
  }

  void WorkerLoop() {
    tInsidePool = true;
    uint64_t seen = 0;
    for (;;) {
      uint64_t generation = generation_.load(std::memory_order_acquire);
      for (int spins = 0; generation == seen && spins < kWorkerSpins; spins++) {
        CpuRelax();
        generation = generation_.load(std::memory_order_acquire);
      }
      if (generation == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] {
          generation = generation_.load(std::memory_order_acquire);
          return generation != seen;
        });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
      }
      seen = generation;
      // Join, then check the job is still open (seq_cst on both sides: either the caller sees this
      // worker active, or this worker sees the job closed). A job opened meanwhile is also fine:
      // its fields were written before it opened.
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) RunChunks();
      active_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex callMutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> open_{false};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 1;
};

// Created on first use and never destroyed: workers sleep in the kernel at process exit, and a
// static destructor joining them could race with Node's own teardown.
ThreadPool& Pool() {
  static ThreadPool* pool = new ThreadPool(DefaultThreadCount());
  return *pool;
}

}  // namespace

int NumThreads() { return Pool().size(); }

void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  ThreadPool& pool = Pool();
  // Nested calls (from inside a chunk) and jobs too small to split run inline.
  if (tInsidePool || pool.size() == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // About four chunks per thread: dynamic claiming evens out a thread the OS preempted.
  const int64_t target = (n + pool.size() * 4 - 1) / (pool.size() * 4);
  pool.Run(n, std::max(grain, target), fn);
}

void ParallelForEach(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  ThreadPool& pool = Pool();
  if (tInsidePool || pool.size() == 1 || n == 1) {
    for (int64_t i = 0; i < n; i++) fn(i);
    return;
  }
  pool.Run(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) fn(i);
  });
}

}  // namespace soppu
