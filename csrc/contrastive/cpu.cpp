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
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

constexpr int64_t kBlockRows = 128;
constexpr int64_t kTileRows = 1024;

std::tuple<at::Tensor, at::Tensor> queue_contrastive_forward_cpu(const at::Tensor& query, const at::Tensor& positive,
                                                                 const at::Tensor& queue, double inv_temperature,
                                                                 bool with_grad) {
  TORCH_CHECK(query.dim() == 2 && positive.sizes() == query.sizes() && queue.dim() == 2 &&
                  queue.size(1) == query.size(1),
              "queue_contrastive_forward: query and positive must be (N, D), queue (K, D)");
  TORCH_CHECK(positive.scalar_type() == query.scalar_type() && queue.scalar_type() == query.scalar_type(),
              "queue_contrastive_forward: query, positive and queue must share one dtype");
  const auto type = query.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "queue_contrastive_forward: dtype must be float32, float16 or bfloat16, got ", type);
  const int64_t n = query.size(0), d = query.size(1), k = queue.size(0);
  const auto options = query.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, options);
  at::Tensor weighted = at::empty({with_grad ? n : 0, d}, options);
  const float inv_t = static_cast<float>(inv_temperature);
  const bool convert_tiles = type != at::kFloat;

  at::parallel_for(0, (n + kBlockRows - 1) / kBlockRows, 1, [&](int64_t block_begin, int64_t block_end) {
    at::Tensor logits_buffer = at::empty({kBlockRows * std::min(k, kTileRows)}, options);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, n - r0);
      // q / T in float32; l_0 = q . p / T starts the running max, with sum exp(l_0 - l_0) = 1.
      const at::Tensor q = query.narrow(0, r0, rows).to(at::kFloat).mul_(inv_t);
      const at::Tensor positive_logit = (q * positive.narrow(0, r0, rows).to(at::kFloat)).sum(1);
      at::Tensor running_max = positive_logit.clone();
      at::Tensor running_sum = at::ones({rows}, options);
      at::Tensor acc = with_grad ? weighted.narrow(0, r0, rows).zero_() : at::Tensor();
      for (int64_t k0 = 0; k0 < k; k0 += kTileRows) {
        const int64_t cols = std::min(kTileRows, k - k0);
        at::Tensor tile = queue.narrow(0, k0, cols);
        if (convert_tiles) tile = tile.to(at::kFloat);
        at::Tensor logits = logits_buffer.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(logits, q, tile.t());
        const at::Tensor grown = at::maximum(running_max, std::get<0>(logits.max(1)));
        const at::Tensor rescale = (running_max - grown).exp_();
        logits.sub_(grown.unsqueeze(1)).exp_();                      // exp(l - m), at most 1
        running_sum.mul_(rescale).add_(logits.sum(1));
        running_max = grown;
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
