// One streaming Sinkhorn pass on CUDA: plain launcher declaration, no torch (see
// csrc/sinkhorn/kernels.cu for the design, csrc/ops.cpp for the operator's meaning).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "loca_kernels/dtype.h"

namespace loca_kernels {

struct SinkhornPassParams {
  const void* scores;       // (rows, cols) of dtype, stride 1 along cols
  Dtype dtype;
  const float* col_scale;   // (cols,) contiguous
  float* out;               // write: p (rows, cols) contiguous; else the column sums (cols,)
  float* shift;             // 0-dim; written only when !write
  float* partial;           // !write: (blocks, cols) workspace, initialised by the kernel
  float* partial_shift;     // !write: (blocks,) workspace
  int64_t rows, cols, row_stride;
  int64_t blocks;           // sinkhorn_pass_blocks(rows, multiprocessors)
  float inv_epsilon;
  bool normalize_rows, write;
};

// Grid size (and so the workspace's first dimension): every block gets at least one row.
int64_t sinkhorn_pass_blocks(int64_t rows, int multiprocessors);

cudaError_t launch_sinkhorn_pass(const SinkhornPassParams& params, cudaStream_t stream);

}  // namespace loca_kernels
