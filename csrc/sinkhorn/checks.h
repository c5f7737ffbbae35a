// Argument checks of sinkhorn_pass (csrc/ops.cpp) shared by the CPU (cpu.cpp) and CUDA
// (bind_cuda.cpp) kernels; each backend then checks the dtypes it takes.
#pragma once

#include <ATen/ATen.h>

#include "loca_kernels/torch_checks.h"

namespace loca_kernels {

// scores (N, K), contiguous along K; col_scale float32 (K,) on the same device.
inline void check_sinkhorn_inputs(const ErrorPrefix& where, const at::Tensor& scores, const at::Tensor& col_scale) {
  // Along K the stride must be 1 (for K = 1 it is never used: torch calls such tensors contiguous).
  TORCH_CHECK_VALUE(scores.dim() == 2 && (scores.stride(1) == 1 || scores.size(1) == 1), where,
                    ": scores must be (N, K), contiguous along K, got sizes ", scores.sizes(), " strides ",
                    scores.strides());
  const int64_t k = scores.size(1);
  TORCH_CHECK_TYPE(col_scale.scalar_type() == at::kFloat, where, ": col_scale must be float32, got ",
                   col_scale.scalar_type());
  TORCH_CHECK_VALUE(col_scale.sizes() == at::IntArrayRef({k}), where, ": col_scale must be (K,) = (", k, ",), got ",
                    col_scale.sizes());
  TORCH_CHECK_VALUE(col_scale.device() == scores.device(), where, ": col_scale must be on ", scores.device(),
                    ", got ", col_scale.device());
}

}  // namespace loca_kernels
