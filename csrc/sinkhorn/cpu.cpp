// One streaming Sinkhorn pass on the CPU (schema and meaning in csrc/ops.cpp). Each row of
// `scores` is read once, in its own dtype, into a small float buffer: the row scale is
// computed from it and then, while it is in cache, either the result row is written or
// the row's contribution to the column log-sums is folded into per-chunk (max, sum)
// partials. Chunks of rows are fixed (not per thread) and reduced in order: the result
// does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunkRows = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 88 written so that the compiler vectorises loops over it (std::exp is a
// scalar call): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial
// (relative error below 2e-7), times 2^n built in the exponent bits. Inputs below -87
// (and -inf) give exp(-87), about 1.6e-38: negligible beside the terms >= 1 of every sum.
// max written as a select on values (std::max returns a reference: a branch, no vectorising).
inline float max_of(float a, float b) { return a > b ? a : b; }

inline float fast_exp(float x) {
  x = max_of(x, -87.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504f + kRound) - kRound;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename scalar_t>
void sinkhorn_pass_kernel(const at::Tensor& scores, const float* col_scale, float inv_epsilon, bool normalize_rows,
                          float row_offset, bool write, float log_scale, float* row_scale, float* result) {
  const int64_t n = scores.size(0), k = scores.size(1), row_stride = scores.stride(0);
  const scalar_t* s = scores.data_ptr<scalar_t>();
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  // Column partials per chunk: (max, sum of exp(y - max)) of y = log Q over the chunk's rows.
  std::vector<float> part_max(write ? 0 : chunks * k, kNegInf), part_sum(write ? 0 : chunks * k, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(k), e(k);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* pmax = write ? nullptr : &part_max[chunk * k];
      float* psum = write ? nullptr : &part_sum[chunk * k];
      for (int64_t i = chunk * kChunkRows; i < std::min(n, (chunk + 1) * kChunkRows); ++i) {
        const scalar_t* row = s + i * row_stride;
        float peak = kNegInf;
        for (int64_t j = 0; j < k; ++j) {
          x[j] = static_cast<float>(row[j]) * inv_epsilon - col_scale[j];
          peak = max_of(peak, x[j]);
        }
        if (normalize_rows) {
          float total = 0.0f;
          for (int64_t j = 0; j < k; ++j) total += fast_exp(x[j] - peak);
          row_scale[i] = peak + std::log(total) + row_offset;
        }
        const float shift = row_scale[i];
        if (write) {
          float* out = result + i * k;
          for (int64_t j = 0; j < k; ++j) out[j] = fast_exp(x[j] - shift + log_scale);
          continue;
        }
        // Online log-sum-exp per column: rescale a partial only when its max grows.
        for (int64_t j = 0; j < k; ++j) {
          const float y = x[j] - shift;
          const float grown = max_of(pmax[j], y);
          e[j] = fast_exp(pmax[j] - grown) * psum[j] + fast_exp(y - grown);
          pmax[j] = grown;
        }
        for (int64_t j = 0; j < k; ++j) psum[j] = e[j];
      }
    }
  });
  if (write) return;
  at::parallel_for(0, k, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float peak = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) peak = max_of(peak, part_max[c * k + j]);
      if (peak == kNegInf) {
        result[j] = kNegInf;
        continue;
      }
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) total += part_sum[c * k + j] * fast_exp(part_max[c * k + j] - peak);
      result[j] = peak + std::log(total);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_pass_cpu(const at::Tensor& scores, const at::Tensor& row_scale,
                                                     const at::Tensor& col_scale, double inv_epsilon,
                                                     bool normalize_rows, double row_offset, bool write,
                                                     double log_scale) {
  TORCH_CHECK(scores.dim() == 2 && scores.stride(1) == 1, "scores must be (N, K), contiguous along K");
  const int64_t n = scores.size(0), k = scores.size(1);
  TORCH_CHECK(row_scale.sizes() == at::IntArrayRef({n}) && row_scale.scalar_type() == at::kFloat,
              "row_scale must be float32 (N,)");
  TORCH_CHECK(col_scale.sizes() == at::IntArrayRef({k}) && col_scale.scalar_type() == at::kFloat,
              "col_scale must be float32 (K,)");
  at::Tensor rows = normalize_rows ? at::empty({n}, row_scale.options()) : row_scale.contiguous().clone();
  at::Tensor cols = col_scale.contiguous();
  at::Tensor result = write ? at::empty({n, k}, row_scale.options()) : at::empty({k}, row_scale.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_pass_cpu", [&] {
    sinkhorn_pass_kernel<scalar_t>(scores, cols.data_ptr<float>(), static_cast<float>(inv_epsilon), normalize_rows,
                                   static_cast<float>(row_offset), write, static_cast<float>(log_scale),
                                   rows.data_ptr<float>(), result.data_ptr<float>());
  });
  return {rows, result};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("sinkhorn_pass", &sinkhorn_pass_cpu);
}
