// Native causal grouped-query attention over the paged KV cache (AttentionArgs in
// src/kernels/kernel-set.ts; spec: src/kernels/ref/attention.ts), prefill and decode in one call.
#include "native-args.h"
#include <algorithm>
#include <vector>

namespace soppu {
struct AttentionView {
  float* out;                 // [M, H·D]
  const float* q;             // [M, H·D]
  const float* kCache;        // [numBlocks, blockSize, Hkv, D]
  const float* vCache;
  const int32_t* blockTable;
  int64_t heads, kvHeads, headDim, blockSize;
  float scale;
};

namespace scalar {
#define SOPPU_ISA 0
#include "simd.inc"
#include "attention-kernels.inc"
#undef SOPPU_ISA
}  // namespace scalar
}  // namespace soppu

SOPPU_BEGIN_AVX2
namespace soppu {
namespace avx2 {
#define SOPPU_ISA 1
#include "simd.inc"
#include "attention-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx2
}  // namespace soppu
SOPPU_END_ISA

SOPPU_BEGIN_AVX512
namespace soppu {
namespace avx512 {
#define SOPPU_ISA 2
#include "simd.inc"
#include "attention-kernels.inc"
#undef SOPPU_ISA
}  // namespace avx512
}  // namespace soppu
SOPPU_END_ISA

namespace soppu {
namespace {

// attention(isa, out, q, kCache, vCache, blockTable, blockTableStart, qStart, qLen, ctxLen,
//           seqs, heads, kvHeads, headDim, blockSize, scale)
Napi::Value Attention(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const Isa isa = IsaFromArg(info[0]);
  if (env.IsExceptionPending()) return env.Undefined();
  const char* op = "attention";
  ArrayArg<float> out, q, kCache, vCache;
  ArrayArg<int32_t> blockTable, blockTableStart, qStart, qLen, ctxLen;
  int64_t seqs, heads, kvHeads, headDim, blockSize;
  double scale;
  if (!GetF32(info, 1, op, "out", &out) || !GetF32(info, 2, op, "q", &q) || !GetF32(info, 3, op, "kCache", &kCache) ||
      !GetF32(info, 4, op, "vCache", &vCache) || !GetI32(info, 5, op, "blockTable", &blockTable) ||
      !GetI32(info, 6, op, "blockTableStart", &blockTableStart) || !GetI32(info, 7, op, "qStart", &qStart) ||
      !GetI32(info, 8, op, "qLen", &qLen) || !GetI32(info, 9, op, "ctxLen", &ctxLen) ||
      !GetInt(info, 10, op, "seqs", 0, &seqs) || !GetInt(info, 11, op, "heads", 1, &heads) ||
      !GetInt(info, 12, op, "kvHeads", 1, &kvHeads) || !GetInt(info, 13, op, "headDim", 1, &headDim) ||
      !GetInt(info, 14, op, "blockSize", 1, &blockSize) || !GetNumber(info, 15, op, "scale", &scale))
    return env.Undefined();
  if (heads % kvHeads != 0) {
    Fail(env, "soppu native attention: heads " + std::to_string(heads) + " is not a multiple of kvHeads " +
                  std::to_string(kvHeads));
    return env.Undefined();
  }
  if (!NeedLength(env, op, "blockTableStart", blockTableStart.length, seqs) ||
      !NeedLength(env, op, "qStart", qStart.length, seqs) || !NeedLength(env, op, "qLen", qLen.length, seqs) ||
      !NeedLength(env, op, "ctxLen", ctxLen.length, seqs))
    return env.Undefined();
  int64_t blockElements = 0, rowElements = 0;
  if (!CheckedProduct(env, op, "blockSize · kvHeads · headDim", {blockSize, kvHeads, headDim}, &blockElements) ||
      !CheckedProduct(env, op, "heads · headDim", {heads, headDim}, &rowElements))
    return env.Undefined();
  const int64_t numBlocks = std::min(kCache.length, vCache.length) / blockElements;
  // Every index the kernel will use is checked here, before any work starts.
  std::vector<int64_t> rowSeq, rowIndex;
  for (int64_t s = 0; s < seqs; s++) {
    const int64_t start = qStart.data[s], count = qLen.data[s], context = ctxLen.data[s], table = blockTableStart.data[s];
    const std::string where = "soppu native attention: sequence " + std::to_string(s) + ": ";
    if (start < 0 || count < 0 || context < count || table < 0) {
      Fail(env, where + "qStart " + std::to_string(start) + ", qLen " + std::to_string(count) + ", ctxLen " +
                    std::to_string(context) + ", blockTableStart " + std::to_string(table) +
                    " (need qStart, blockTableStart >= 0 and 0 <= qLen <= ctxLen)");
      return env.Undefined();
    }
    int64_t rowsEnd = 0;
    if (!CheckedProduct(env, op, "(qStart + qLen) · heads · headDim", {start + count, rowElements}, &rowsEnd) ||
        !NeedLength(env, op, "q", q.length, rowsEnd) || !NeedLength(env, op, "out", out.length, rowsEnd))
      return env.Undefined();
    const int64_t blocksUsed = (context + blockSize - 1) / blockSize;
    if (!NeedLength(env, op, "blockTable", blockTable.length, table + blocksUsed)) return env.Undefined();
    for (int64_t j = 0; j < blocksUsed; j++) {
      const int64_t block = blockTable.data[table + j];
      if (block < 0 || block >= numBlocks) {
        Fail(env, where + "block id " + std::to_string(block) + " at blockTable[" + std::to_string(table + j) +
                      "] is outside the cache of " + std::to_string(numBlocks) + " blocks");
        return env.Undefined();
      }
    }
    for (int64_t i = 0; i < count; i++) {
      rowSeq.push_back(s);
      rowIndex.push_back(i);
    }
  }
  const int64_t rows = static_cast<int64_t>(rowSeq.size());
  if (rows == 0) return env.Undefined();
  // A task is one row and a slice of one KV head's query heads. Whole groups share K/V loads; the
  // group is split only when there would otherwise be too few tasks to keep every thread busy.
  const int64_t groupSize = heads / kvHeads;
  int64_t slices = 1;
  while (slices < groupSize && rows * kvHeads * slices < 4 * static_cast<int64_t>(NumThreads())) slices *= 2;
  const int64_t headsPerTask = (groupSize + slices - 1) / slices;
  slices = (groupSize + headsPerTask - 1) / headsPerTask;
  const int64_t unitsPerRow = kvHeads * slices;
  const int64_t tasks = rows * unitsPerRow;
  const AttentionView view{out.data, q.data, kCache.data, vCache.data, blockTable.data,
                           heads, kvHeads, headDim, blockSize, static_cast<float>(scale)};
  ParallelFor(tasks, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch, grown and kept (a decode row's call has a few tasks per thread, and four
    // allocations per chunk were a visible share of it)
    thread_local std::vector<float> scratch;
    const size_t accSize = static_cast<size_t>(headsPerTask * headDim), scoresSize = static_cast<size_t>(headsPerTask * blockSize);
    if (scratch.size() < accSize + scoresSize + 2 * static_cast<size_t>(headsPerTask)) scratch.resize(accSize + scoresSize + 2 * static_cast<size_t>(headsPerTask));
    float* const acc = scratch.data();
    float* const scores = acc + accSize;
    float* const runningMax = scores + scoresSize;
    float* const runningSum = runningMax + headsPerTask;
    for (int64_t task = begin; task < end; task++) {
      // Zigzag over rows (first, last, second, second-last, …) so each contiguous chunk mixes
      // short and long causal prefixes.
      const int64_t unit = task / unitsPerRow;
      const int64_t r = (unit % 2 == 0) ? unit / 2 : rows - 1 - unit / 2;
      const int64_t s = rowSeq[static_cast<size_t>(r)], i = rowIndex[static_cast<size_t>(r)];
      const int64_t row = qStart.data[s] + i;
      const int64_t position = ctxLen.data[s] - qLen.data[s] + i;
      const int64_t kvHead = (task % unitsPerRow) / slices, slice = (task % unitsPerRow) % slices;
      const int64_t firstHead = kvHead * groupSize + slice * headsPerTask;
      const int64_t headCount = std::min(headsPerTask, groupSize - slice * headsPerTask);
      SOPPU_DISPATCH(isa, AttendGroup(view, row, firstHead, headCount, blockTableStart.data[s], position, acc, scores, runningMax,
                                      runningSum));
    }
  });
  return env.Undefined();
}

}  // namespace

void RegisterAttention(Napi::Env env, Napi::Object exports) { exports.Set("attention", Napi::Function::New(env, Attention)); }

}  // namespace soppu
