// The matmul entry point shared by matmul.cc (its own napi op) and lora.cc (matmulLora, a linear layer
// with its adapter deltas fused into the same pool job).
#pragma once
#include "common.h"
#include "simd-common.h"
#include <functional>

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

// Extra work that runs inside the matmul's own pool job, so the two share one dispatch and the
// threads balance them together. Claimed in order after the matmul's blocks: `tasks` (which may read
// only what the matmul does not write, so they start while other threads finish the matmul), then
// `finalTasks` (each starts once the matmul and every task are done, so it may read them and change y).
struct MatmulFusion {
  int64_t tasks = 0;
  std::function<void(int64_t task)> run;
  int64_t finalTasks = 0;
  std::function<void(int64_t task)> runFinal;
};

// y[M,N] = x[M,K] · W[N,K]ᵀ (or += when args.accumulate), on the pool; with `fusion`, its work too.
void Matmul(Isa isa, const MatmulArgs& args, const MatmulFusion* fusion = nullptr);

}  // namespace soppu
