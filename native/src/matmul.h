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
// threads balance them together: `tasks` tasks claimed after every output block of the matmul. A task
// may start on what does not need y (the matmul may still be running on other threads) and must call
// waitForMatmul() before it reads or writes y.
struct MatmulFusion {
  int64_t tasks = 0;
  std::function<void(int64_t task, const std::function<void()>& waitForMatmul)> run;
};

// y[M,N] = x[M,K] · W[N,K]ᵀ (or += when args.accumulate), on the pool; with `fusion`, its work too.
void Matmul(Isa isa, const MatmulArgs& args, const MatmulFusion* fusion = nullptr);

}  // namespace soppu
