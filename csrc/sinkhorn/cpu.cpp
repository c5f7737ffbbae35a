// One streaming Sinkhorn pass on the CPU (schema and meaning in csrc/ops.cpp).
//
// Each row of `scores` is read once, in its own dtype, and turned into x = s / eps - col_scale
// in a float row buffer (the output row itself when writing). One exp per entry: with the
// row's max m, e = exp(x - m) gives both the row's sum and, scaled by one number per row, the
// row's probabilities and its contribution to the column sums. Rows are cut into fixed chunks
// whose column partial sums are added in chunk order, so the result does not depend on the
// number of threads.
//
// The loops over a row are plain C++ with 16 independent lanes for sums and maxima (float
// reductions are otherwise not vectorised without -ffast-math), compiled for AVX-512, AVX2 and
// the baseline instruction set, run as loca_kernels::cpu_isa() says.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "loca_kernels/cpu_math.h"

#ifdef __linux__
#include <sys/mman.h>

#include <cstdlib>
#endif

namespace {

using loca_kernels::exp_sum_in_place;
using loca_kernels::max_of;

constexpr int64_t kChunkRows = 128;
constexpr int64_t kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max_j x[j], in 16 lanes.
inline float max_over(const float* x, int64_t k) {
  float lane_max[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = max_of(lane_max[l], x[j + l]);
  }
  float peak = kNegInf;
  for (; j < k; ++j) peak = max_of(peak, x[j]);
  for (int64_t l = 0; l < kLanes; ++l) peak = max_of(peak, lane_max[l]);
  return peak;
}

// x[j] = s[j] * inv_epsilon - col_scale[j]; returns max_j x[j], and in *nan 0 when every
// x[j] is finite, NaN otherwise (a NaN or infinite score, or a NaN col_scale): the row's sum
// of x, times 0 (finite x overflow it only past K |x| ~ 3.4e38). Adding it to the row's weight
// makes such a row all NaN, as in the reference. Two loops: x and its sum vectorise, the max
// (a select, which GCC leaves scalar) reads x back from L1; together no slower than x and the
// max in one scalar loop.
inline float shift_row(const float* s, const float* col_scale, float inv_epsilon, int64_t k, float* x, float* nan) {
  float lane_sum[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      x[j + l] = s[j + l] * inv_epsilon - col_scale[j + l];
      lane_sum[l] += x[j + l];
    }
  }
  float total = 0.0f;
  for (; j < k; ++j) {
    x[j] = s[j] * inv_epsilon - col_scale[j];
    total += x[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) total += lane_sum[l];
  *nan = total * 0.0f;
  return max_over(x, k);
}

// x[j] = exp(s[j] * inv_epsilon - col_scale[j]) where that exponent is NaN or infinite (exp, not
// fast_exp, which maps NaN and +inf to finite values): an unnormalised write is exp(x) entrywise.
inline void exp_where_not_finite(const float* s, const float* col_scale, float inv_epsilon, int64_t k, float* x) {
  for (int64_t j = 0; j < k; ++j) {
    const float exponent = s[j] * inv_epsilon - col_scale[j];
    if (!std::isfinite(exponent)) x[j] = std::exp(exponent);
  }
}

// x[j] *= a.
inline void scale(float* x, float a, int64_t k) {
  for (int64_t j = 0; j < k; ++j) x[j] *= a;
}

// y[j] = y[j] * a + x[j] * b.
inline void scale_add(float* y, float a, const float* x, float b, int64_t k) {
  for (int64_t j = 0; j < k; ++j) y[j] = y[j] * a + x[j] * b;
}

// One pass's inputs and outputs, for the chunks of rows of one thread.
template <typename scalar_t>
struct Pass {
  const scalar_t* scores;
  const float* col_scale;
  float inv_epsilon;
  bool normalize_rows, write;
  int64_t n, k, row_stride;
  float* result;       // write: (N, K)
  float* partial;      // !write: (chunks, K) column sums of exp(x - row_scale - chunk_shift)
  float* chunk_shift;  // !write: (chunks,) 0 for normalised rows, else the largest x so far
};

// The rows of one chunk; `converted` (K floats, half/bf16 scores only) and `buffer` (K floats,
// !write) are the calling thread's.
template <typename scalar_t>
inline void process_chunk(const Pass<scalar_t>& p, int64_t chunk, float* converted, float* buffer) {
  const int64_t k = p.k;
  float* sums = p.write ? nullptr : p.partial + chunk * k;
  float* shift = p.write ? nullptr : p.chunk_shift + chunk;
  for (int64_t i = chunk * kChunkRows; i < std::min(p.n, (chunk + 1) * kChunkRows); ++i) {
    const float* row = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      row = p.scores + i * p.row_stride;
    } else {
      for (int64_t j = 0; j < k; ++j) converted[j] = static_cast<float>(p.scores[i * p.row_stride + j]);
      row = converted;
    }
    float* x = p.write ? p.result + i * k : buffer;
    float nan = 0.0f;
    const float peak = shift_row(row, p.col_scale, p.inv_epsilon, k, x, &nan);
    // fast_exp does not propagate NaN: a row with a non-finite x is made all NaN by adding
    // `nan` to the factor that multiplies its probabilities.
    if (!p.normalize_rows) {
      if (p.write) {
        exp_sum_in_place(x, 0.0f, k);
        if (nan != 0.0f) exp_where_not_finite(row, p.col_scale, p.inv_epsilon, k, x);
        continue;
      }
      // exp(x - shift) with shift >= every x of the chunk so far: no overflow.
      const float grown = max_of(*shift, peak);
      const float rescale = *shift == grown ? 1.0f : std::exp(*shift - grown);
      *shift = grown;
      exp_sum_in_place(x, grown, k);
      scale_add(sums, rescale + nan, x, 1.0f, k);
      continue;
    }
    const float weight = 1.0f / exp_sum_in_place(x, peak, k) + nan;  // the sum is >= 1 (the max's term)
    if (p.write) {
      scale(x, weight, k);
    } else {
      scale_add(sums, 1.0f, x, weight, k);
    }
  }
}

// process_chunk compiled for each instruction set, run as loca_kernels::cpu_isa() says.
LOCA_CPU_VARIANTS(process_chunk, , (const Pass<scalar_t>& p, int64_t chunk, float* converted, float* buffer),
                  process_chunk(p, chunk, converted, buffer))

template <typename scalar_t>
void sinkhorn_pass_kernel(const at::Tensor& scores, const float* col_scale, float inv_epsilon, bool normalize_rows,
                          bool write, float* result, float* shift_out) {
  const int64_t n = scores.size(0), k = scores.size(1);
  const int64_t chunks = (n + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(write ? 0 : chunks * k, 0.0f), chunk_shift(chunks, normalize_rows ? 0.0f : kNegInf);
  const Pass<scalar_t> pass{scores.data_ptr<scalar_t>(), col_scale, inv_epsilon, normalize_rows, write, n, k,
                            scores.stride(0), result, partial.data(), chunk_shift.data()};
  const auto run = LOCA_CPU_VARIANT(process_chunk, <scalar_t>);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> converted(std::is_same_v<scalar_t, float> ? 0 : k), buffer(write ? 0 : k);
    for (int64_t chunk = begin; chunk < end; ++chunk) run(pass, chunk, converted.data(), buffer.data());
  });
  if (write) {
    *shift_out = 0.0f;
    return;
  }
  float shift = kNegInf;
  for (int64_t c = 0; c < chunks; ++c) shift = max_of(shift, chunk_shift[c]);
  std::vector<float> factor(chunks);
  for (int64_t c = 0; c < chunks; ++c) factor[c] = chunk_shift[c] == shift ? 1.0f : std::exp(chunk_shift[c] - shift);
  std::fill(result, result + k, 0.0f);
  for (int64_t c = 0; c < chunks; ++c) scale_add(result, 1.0f, &partial[c * k], factor[c], k);
  *shift_out = shift;
}

// The result of a writing pass, an (N, K) float32 tensor written once: when large, backed by
// transparent huge pages where the system allows them (its "madvise" mode, common), which
// makes first-touch page faults 512x fewer (they took ~40 ms of 80 for N = 12544, K = 4096).
at::Tensor empty_result(int64_t n, int64_t k, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(k) * sizeof(float);
  if (bytes >= 16 * kHugePage) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage) == 0) {
      madvise(data, bytes, MADV_HUGEPAGE);  // a hint: failure leaves ordinary pages
      return at::from_blob(data, {n, k}, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty({n, k}, options);
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_pass_cpu(const at::Tensor& scores, const at::Tensor& col_scale,
                                                     double inv_epsilon, bool normalize_rows, bool write) {
  const loca_kernels::ErrorPrefix where{"sinkhorn_pass", "cpu"};
  loca_kernels::check_sinkhorn_inputs(where, scores, col_scale);
  loca_kernels::check_cpu_float(where, "scores", scores);
  const int64_t n = scores.size(0), k = scores.size(1);
  const at::Tensor cols = col_scale.contiguous();
  const auto options = col_scale.options();
  at::Tensor result = write ? empty_result(n, k, options) : at::empty({k}, options);
  at::Tensor shift = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_pass_cpu", [&] {
    sinkhorn_pass_kernel<scalar_t>(scores, cols.data_ptr<float>(), static_cast<float>(inv_epsilon), normalize_rows,
                                   write, result.data_ptr<float>(), shift.data_ptr<float>());
  });
  return {result, shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("sinkhorn_pass", &sinkhorn_pass_cpu);
}
