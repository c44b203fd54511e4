// Placeholder-free minimal pool: runs inline until the kernels issue replaces it with a persistent pool.
#include "common.h"
#include <thread>

namespace soppu {
int NumThreads() { return 1; }
void ParallelFor(int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
  if (n > 0) fn(0, n);
}
}  // namespace soppu
