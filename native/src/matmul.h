// The matmul entry point shared by matmul.cc (its own napi op) and lora.cc (matmulLora, a linear layer
// with its adapter deltas fused into the same pool job).
#pragma once
#include "common.h"
#include "simd-common.h"
#include <algorithm>
#include <functional>
#include <vector>

namespace soppu {

struct MatmulArgs {
  float* y;
  const float* x;
  const void* w;
  WeightDtype dtype;
  int64_t m, n, k;
  int64_t kBlock;
  bool accumulate;
};

// A run of memory that a fused job's later work reads, in whole cache lines.
struct PrefetchRange {
  const char* data;
  int64_t lines;
};

// Requests lines [begin, end) of a list of ranges (numbered over the ranges in order) to L2, a few
// after each matmul tile: the loads overlap the matmul's arithmetic, and at most a few are in flight
// at once, so they neither stall the tile nor crowd out the matmul's own weight stream.
class LinePrefetcher {
 public:
  LinePrefetcher(const std::vector<PrefetchRange>& ranges, int64_t begin, int64_t end, int64_t steps)
      : ranges_(ranges), left_(end - begin), perStep_(std::max<int64_t>(1, (end - begin + steps - 1) / std::max<int64_t>(1, steps))) {
    while (range_ < ranges_.size() && begin >= ranges_[range_].lines) begin -= ranges_[range_++].lines;
    line_ = begin;
  }
  void Step() { Issue(perStep_); }
  void Flush() { Issue(left_); }

 private:
  void Issue(int64_t count) {
    for (count = std::min(count, left_); count > 0 && range_ < ranges_.size(); count--, left_--) {
      __builtin_prefetch(ranges_[range_].data + line_ * 64, 0, 2);
      if (++line_ == ranges_[range_].lines) {
        range_++;
        line_ = 0;
      }
    }
  }
  const std::vector<PrefetchRange>& ranges_;
  size_t range_ = 0;
  int64_t line_ = 0, left_, perStep_;
};

// Extra work that runs inside the matmul's own pool job, so the two share one dispatch and the
// threads balance them together. Claimed in order after the matmul's blocks: `tasks` (which may read
// only what the matmul does not write, so they start while other threads finish the matmul), then
// `finalTasks` (each starts once the matmul and every task are done, so it may read them and change y).
struct MatmulFusion {
  int64_t tasks = 0;
  std::function<void(int64_t task)> run;
  int64_t finalTasks = 0;
  std::function<void(int64_t task)> runFinal;
  // memory the tasks will read, requested while the matmul's blocks run (null: none)
  const std::vector<PrefetchRange>* prefetch = nullptr;
  int64_t prefetchLines = 0;
};

// The most matmuls MatmulParts runs in one job (a layer's q, k and v; its gate and up).
constexpr int64_t kMaxMatmulParts = 8;

// For each of `count` parts, y[M,N] = x[M,K] · W[N,K]ᵀ (or += when its accumulate), in ONE pool job over
// the parts' weights in turn: every part has the same x, m and k (each its own W, dtype, y and n). With
// `fusion`, its work too, after every part's blocks.
void MatmulParts(Isa isa, const MatmulArgs* parts, int64_t count, const MatmulFusion* fusion = nullptr);

// y[M,N] = x[M,K] · W[N,K]ᵀ (or += when args.accumulate), on the pool; with `fusion`, its work too.
inline void Matmul(Isa isa, const MatmulArgs& args, const MatmulFusion* fusion = nullptr) { MatmulParts(isa, &args, 1, fusion); }

}  // namespace soppu
