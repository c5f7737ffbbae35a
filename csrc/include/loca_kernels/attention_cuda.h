// Plain C++ interface of the CUDA masked cross-attention kernels (csrc/attention/kernels.cu):
// raw pointers, element strides and sizes, no torch. csrc/attention/bind_cuda.cpp fills it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "loca_kernels/attention.h"
#include "loca_kernels/dtype.h"

namespace loca_kernels {

// A (B, N, H, D) tensor whose last dim is contiguous; strides are in elements.
struct AttentionTensor {
  void* data;
  int64_t stride_b, stride_n, stride_h;
};

// The compact keep form (csrc/ops.cpp): query row i uses keep row i % rows.
struct AttentionKeep {
  const int32_t* index;  // (rows, row_stride) int32; a run's start when is_run
  const int32_t* count;  // (rows,) visible tokens per row
  int64_t row_stride;    // elements between keep rows of `index`
  int64_t length;        // index.size(1): the most positions a list row can hold
  int rows;              // 1, Bk or Bq
  bool is_run;
};

struct AttentionShape {
  int bq, bk, nq, nk, heads, head_dim;
};

struct AttentionForwardParams {
  AttentionShape shape;
  AttentionKeep keep;
  Dtype dtype;
  float scale;
  AttentionTensor q, k, v;  // read only
  AttentionTensor out;      // (Bq, Nq, H, D), written
  float* lse;               // (Bq, H, Nq) contiguous, written
};

struct AttentionBackwardParams {
  AttentionShape shape;
  AttentionKeep keep;
  Dtype dtype;
  float scale;
  AttentionTensor grad_out, q, k, v, out;  // read only
  const float* lse;                         // (Bq, H, Nq) contiguous
  float* delta;                             // (Bq, H, Nq) contiguous workspace: rowsum(grad_out * out)
  AttentionTensor grad_q;                   // (Bq, Nq, H, D), written
  // (Bk, Nk, H, D), zero-filled by the caller: only visible tokens are written.
  AttentionTensor grad_k, grad_v;
};

// Enqueue the kernels on `stream`; return the launch error (cudaSuccess when none).
cudaError_t launch_attention_forward(const AttentionForwardParams& params, cudaStream_t stream);
cudaError_t launch_attention_backward(const AttentionBackwardParams& params, cudaStream_t stream);

}  // namespace loca_kernels
