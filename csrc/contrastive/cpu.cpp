// InfoNCE against a queue on the CPU (schema and meaning in csrc/ops.cpp).
//
// Rows are cut into fixed blocks of kBlockRows; each block runs over the whole queue in tiles
// of kTileRows, in order, keeping per row a running max m, a running sum s of exp(l - m) and,
// when a gradient is wanted, a running sum acc of exp(l - m) queue_k (flash attention with the
// queue as keys and values). A tile's logits come from one matrix product on a strided view
// of the queue (a float32 queue is never copied; a half or bfloat16 tile is converted, one
// tile at a time), so only a (kBlockRows, kTileRows) block of logits exists per thread.
//
// Blocks run in parallel with at::parallel_for; the products and reductions inside run on the
// calling thread (ATen does not nest parallelism), on blocks whose shapes do not depend on the
// thread count, so neither does the result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "loca_kernels/cpu_math.h"
#include "loca_kernels/torch_checks.h"

namespace {

using loca_kernels::exp_sum_in_place;
using loca_kernels::max_of;

constexpr int64_t kBlockRows = 128;
constexpr int64_t kTileRows = 1024;
constexpr int64_t kLanes = 16;

// One tile of logits (rows, cols) in place: per row, the running max grows to cover the tile,
// the tile becomes exp(l - max) (at most 1) and the running sum is rescaled and grows by its
// sum; rescale[r] = exp(old max - new max) is what the caller multiplies its accumulator by.
// 16 independent lanes per row: a float max is otherwise not vectorised.
// A NaN or infinite logit makes the row's loss NaN (SPEC.md section 5): the tile's sum of
// l * 0 (0, or NaN) is added to the new max, so that rescale and the running sum are NaN.
inline void update_rows(float* logits, int64_t rows, int64_t cols, float* running_max, float* running_sum,
                        float* rescale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = logits + r * cols;
    float lane[kLanes], lane_nan[kLanes] = {};
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        lane[l] = max_of(lane[l], x[j + l]);
        lane_nan[l] += x[j + l] * 0.0f;
      }
    }
    float grown = running_max[r], nan = 0.0f;
    for (; j < cols; ++j) grown = max_of(grown, x[j]), nan += x[j] * 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) grown = max_of(grown, lane[l]), nan += lane_nan[l];
    grown += nan;
    const float total = exp_sum_in_place(x, grown, cols);
    rescale[r] = std::exp(running_max[r] - grown);
    running_sum[r] = running_sum[r] * rescale[r] + total;
    running_max[r] = grown;
  }
}

// update_rows compiled for each instruction set, run as loca_kernels::cpu_isa() says.
#ifdef LOCA_KERNELS_X86_VARIANTS
LOCA_TARGET_AVX512 void update_rows_avx512(float* logits, int64_t rows, int64_t cols, float* running_max,
                                           float* running_sum, float* rescale) {
  update_rows(logits, rows, cols, running_max, running_sum, rescale);
}
LOCA_TARGET_AVX2 void update_rows_avx2(float* logits, int64_t rows, int64_t cols, float* running_max,
                                       float* running_sum, float* rescale) {
  update_rows(logits, rows, cols, running_max, running_sum, rescale);
}
#endif
__attribute__((flatten)) void update_rows_baseline(float* logits, int64_t rows, int64_t cols, float* running_max,
                                                   float* running_sum, float* rescale) {
  update_rows(logits, rows, cols, running_max, running_sum, rescale);
}

std::tuple<at::Tensor, at::Tensor> queue_contrastive_forward_cpu(const at::Tensor& query, const at::Tensor& positive,
                                                                 const at::Tensor& queue, double inv_temperature,
                                                                 bool with_grad) {
  const loca_kernels::ErrorPrefix where{"queue_contrastive_forward", "cpu"};
  TORCH_CHECK_VALUE(query.dim() == 2, where, ": query must be (N, D), got sizes ", query.sizes());
  TORCH_CHECK_VALUE(positive.sizes() == query.sizes(), where, ": positive must be (N, D) = ", query.sizes(),
                    " like query, got ", positive.sizes());
  TORCH_CHECK_VALUE(queue.dim() == 2 && queue.size(1) == query.size(1), where, ": queue must be (K, D) with D = ",
                    query.size(1), ", got ", queue.sizes());
  TORCH_CHECK_TYPE(positive.scalar_type() == query.scalar_type() && queue.scalar_type() == query.scalar_type(), where,
                   ": query, positive and queue must share one dtype, got ", query.scalar_type(), ", ",
                   positive.scalar_type(), " and ", queue.scalar_type());
  loca_kernels::kernel_dtype(where, "query", query);
  const auto type = query.scalar_type();
  const int64_t n = query.size(0), d = query.size(1), k = queue.size(0);
  const auto options = query.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, options);
  at::Tensor weighted = at::empty({with_grad ? n : 0, d}, options);
  const float inv_t = static_cast<float>(inv_temperature);
  const bool convert_tiles = type != at::kFloat;
  const auto update = LOCA_CPU_VARIANT(update_rows, );

  // At least two work items, so that even one row block runs inside a parallel region, where
  // the BLAS calls stay on their thread: outside one, every small product of a single block
  // would wake the BLAS's own threads (measured: 6x slower for N = 33 with 2 threads).
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, std::max<int64_t>(blocks, 2), 1, [&](int64_t block_begin, int64_t block_end) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out explicitly.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor logits_buffer = at::empty({kBlockRows * std::min(k, kTileRows)}, options);
    for (int64_t block = block_begin; block < std::min(block_end, blocks); ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, n - r0);
      // q / T in float32; l_0 = q . p / T starts the running max, with sum exp(l_0 - l_0) = 1.
      const at::Tensor q = query.narrow(0, r0, rows).to(at::kFloat) * inv_t;  // a new tensor: never query itself
      const at::Tensor positive_logit = (q * positive.narrow(0, r0, rows).to(at::kFloat)).sum(1);
      at::Tensor running_max = positive_logit.clone();
      at::Tensor running_sum = positive_logit * 0 + 1;  // NaN for a NaN or infinite l_0
      at::Tensor rescale = at::empty({rows}, options);
      at::Tensor acc = with_grad ? weighted.narrow(0, r0, rows).zero_() : at::Tensor();
      for (int64_t k0 = 0; k0 < k; k0 += kTileRows) {
        const int64_t cols = std::min(kTileRows, k - k0);
        at::Tensor tile = queue.narrow(0, k0, cols);
        if (convert_tiles) tile = tile.to(at::kFloat);
        at::Tensor logits = logits_buffer.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(logits, q, tile.t());
        update(logits.data_ptr<float>(), rows, cols, running_max.data_ptr<float>(), running_sum.data_ptr<float>(),
               rescale.data_ptr<float>());
        if (with_grad) acc.mul_(rescale.unsqueeze(1)).addmm_(logits, tile);
      }
      // lse = m + log(s); loss = lse - l_0; weighted = acc / s = sum_k p_k queue_k.
      loss.narrow(0, r0, rows).copy_(running_max + running_sum.log() - positive_logit);
      if (with_grad) acc.div_(running_sum.unsqueeze(1));
    }
  });
  return {loss, weighted};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("queue_contrastive_forward", &queue_contrastive_forward_cpu);
}
