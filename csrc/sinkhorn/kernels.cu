// One streaming Sinkhorn pass on CUDA, the design of the Triton twin
// (loca_kernels/sinkhorn/triton.py). A fixed grid (at most 4 blocks per SM) of 8-warp blocks,
// each owning a contiguous range of rows, taken 8 rows at a time. Sweep 1, one warp per row:
// the row's max and, for normalised rows, its sum of exp(x - max) online. Sweep 2, one thread
// per column over the 8 rows (a re-read from cache, coalesced): p is stored, or added into the
// block's column sums, which each thread owns for its columns (no atomics, no syncs). Sums are
// in shared memory when K is small enough, otherwise in the global workspace; a second kernel
// adds the blocks' sums in block order, so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "loca_kernels/sinkhorn.h"

namespace loca_kernels {
namespace {

constexpr int kWarps = 8;  // rows per group, one warp each in sweep 1
constexpr int kThreads = kWarps * 32;
constexpr int kBlocksPerSM = 4;
constexpr int64_t kSharedCols = 8192;  // 32 KiB of sums: 4 blocks still fit an SM of sm_80
constexpr int kReduceThreads = 128;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// x = s * inv_epsilon - c, rounded twice as on the CPU: never contracted into an FMA, so both
// sweeps compute the same x and x - max <= 0.
__device__ __forceinline__ float shifted(float s, float c, float inv_epsilon) {
  return __fsub_rn(__fmul_rn(s, inv_epsilon), c);
}

// exp(from - to), for to >= from; equal values (-inf included) give 1, not exp(nan).
__device__ __forceinline__ float decay(float from, float to) { return from == to ? 1.0f : expf(from - to); }

template <typename T, bool kNormalize, bool kWrite>
__global__ void __launch_bounds__(kThreads) sinkhorn_pass_kernel(SinkhornPassParams p, int64_t rows_per_block) {
  extern __shared__ float shared_sums[];
  // row_nan: 0, or NaN for a row with a non-finite x (a NaN or infinite score, or a NaN
  // col_scale), which is then all NaN: added to its weight, or to its shift for unnormalised
  // sums. (An unnormalised write skips sweep 1: p = exp(x) entrywise.)
  __shared__ float row_max[kWarps], row_weight[kWarps], row_nan[kWarps];
  const T* scores = static_cast<const T*>(p.scores);
  const float* col_scale = p.col_scale;
  const float inv_epsilon = p.inv_epsilon;
  const int64_t cols = p.cols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = min(p.rows, begin + rows_per_block);
  float* sums = nullptr;
  if constexpr (!kWrite) {
    sums = cols <= kSharedCols ? shared_sums : p.partial + static_cast<int64_t>(blockIdx.x) * cols;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) sums[j] = 0.0f;
  }
  // Unnormalised sums are of exp(x - shift), shift the largest x of the block so far.
  float shift = kNegInf;
  for (int64_t first = begin; first < end; first += kWarps) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kWarps), end - first));
    if constexpr (kNormalize || !kWrite) {
      if (warp < count) {
        const T* row = scores + (first + warp) * p.row_stride;
        float m = kNegInf, s = 0.0f, nan = 0.0f;
        for (int64_t j = lane; j < cols; j += 32) {
          const float x = shifted(to_float(row[j]), col_scale[j], inv_epsilon);
          nan += x * 0.0f;  // NaN once an x is NaN or infinite
          if constexpr (kNormalize) {
            if (x > m) {
              s = s * decay(m, x) + 1.0f;
              m = x;
            } else {
              s += decay(x, m);
            }
          } else {
            m = fmaxf(m, x);
          }
        }
        for (int offset = 16; offset > 0; offset /= 2) {
          nan += __shfl_xor_sync(0xffffffffu, nan, offset);
          const float other_m = __shfl_xor_sync(0xffffffffu, m, offset);
          if constexpr (kNormalize) {
            const float other_s = __shfl_xor_sync(0xffffffffu, s, offset);
            const float grown = fmaxf(m, other_m);
            s = s * decay(m, grown) + other_s * decay(other_m, grown);
            m = grown;
          } else {
            m = fmaxf(m, other_m);
          }
        }
        if (lane == 0) {
          row_max[warp] = m;
          row_weight[warp] = 1.0f / s + nan;  // s >= 1: the max's own term
          row_nan[warp] = nan;
        }
      }
      __syncthreads();
    }
    float rescale = 1.0f;
    if constexpr (!kNormalize && !kWrite) {
      float grown = shift;
      for (int r = 0; r < count; ++r) grown = fmaxf(grown, row_max[r]);
      rescale = decay(shift, grown);
      shift = grown;
    }
    float subtract[kWarps], weight[kWarps];
#pragma unroll
    for (int r = 0; r < kWarps; ++r) {
      if constexpr (kNormalize) {
        subtract[r] = r < count ? row_max[r] : 0.0f;
      } else {
        subtract[r] = kWrite ? 0.0f : shift + (r < count ? row_nan[r] : 0.0f);
      }
      weight[r] = kNormalize && r < count ? row_weight[r] : 1.0f;
    }
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const float c = col_scale[j];
      float total = 0.0f;
#pragma unroll
      for (int r = 0; r < kWarps; ++r) {
        if (r < count) {
          const float x = shifted(to_float(scores[(first + r) * p.row_stride + j]), c, inv_epsilon);
          const float e = expf(x - subtract[r]);
          if constexpr (kWrite) {
            p.out[(first + r) * cols + j] = kNormalize ? e * weight[r] : e;
          } else {
            total += kNormalize ? e * weight[r] : e;
          }
        }
      }
      if constexpr (!kWrite) sums[j] = sums[j] * rescale + total;
    }
    // row_max and row_weight are rewritten by the next group's sweep 1.
    if constexpr (kNormalize || !kWrite) __syncthreads();
  }
  if constexpr (!kWrite) {
    if (cols <= kSharedCols) {
      float* partial = p.partial + static_cast<int64_t>(blockIdx.x) * cols;
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) partial[j] = sums[j];
    }
    if (threadIdx.x == 0) p.partial_shift[blockIdx.x] = kNormalize ? 0.0f : shift;
  }
}

// Column sums of all blocks, in block order, brought to the common shift (the largest).
__global__ void __launch_bounds__(kReduceThreads) sinkhorn_reduce_kernel(SinkhornPassParams p) {
  float shift = kNegInf;
  for (int64_t b = 0; b < p.blocks; ++b) shift = fmaxf(shift, p.partial_shift[b]);
  if (p.normalize_rows) shift = 0.0f;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (j == 0) *p.shift = shift;
  if (j >= p.cols) return;
  float total = 0.0f;
  for (int64_t b = 0; b < p.blocks; ++b) total += p.partial[b * p.cols + j] * decay(p.partial_shift[b], shift);
  p.out[j] = total;
}

template <typename T>
cudaError_t launch_typed(const SinkhornPassParams& p, cudaStream_t stream) {
  if (p.blocks > 0) {
    const int64_t groups = (p.rows + kWarps - 1) / kWarps;
    const int64_t rows_per_block = (groups + p.blocks - 1) / p.blocks * kWarps;
    const size_t shared = !p.write && p.cols <= kSharedCols ? static_cast<size_t>(p.cols) * sizeof(float) : 0;
    auto kernel = p.normalize_rows
                      ? (p.write ? sinkhorn_pass_kernel<T, true, true> : sinkhorn_pass_kernel<T, true, false>)
                      : (p.write ? sinkhorn_pass_kernel<T, false, true> : sinkhorn_pass_kernel<T, false, false>);
    kernel<<<static_cast<unsigned>(p.blocks), kThreads, shared, stream>>>(p, rows_per_block);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (!p.write) {
    const int64_t blocks = p.cols > 0 ? (p.cols + kReduceThreads - 1) / kReduceThreads : 1;
    sinkhorn_reduce_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t sinkhorn_pass_blocks(int64_t rows, int multiprocessors) {
  const int64_t groups = (rows + kWarps - 1) / kWarps;
  if (groups == 0) return 0;
  const int64_t most = static_cast<int64_t>(kBlocksPerSM) * (multiprocessors > 0 ? multiprocessors : 1);
  const int64_t per_block = (groups + most - 1) / most;
  return (groups + per_block - 1) / per_block;
}

cudaError_t launch_sinkhorn_pass(const SinkhornPassParams& params, cudaStream_t stream) {
  switch (params.dtype) {
    case Dtype::kFloat32: return launch_typed<float>(params, stream);
    case Dtype::kFloat16: return launch_typed<__half>(params, stream);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace loca_kernels
