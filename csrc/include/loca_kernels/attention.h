// What the CUDA masked cross-attention kernels are compiled for: plain constants, no torch and
// no CUDA, so that every build (csrc/ops.cpp) can report them.
#pragma once

#include <cstdint>
#include <iterator>

namespace loca_kernels {

// The head dims D of the CUDA kernels, one template instance each (csrc/attention/kernels.cu
// dispatches over this list). The one list: bind_cuda.cpp checks D against it and names it in
// its error, and Python reads it through the operator attention_cuda_head_dims() (csrc/ops.cpp).
inline constexpr int kAttentionCudaHeadDims[] = {16, 32, 64, 128};
inline constexpr int kAttentionCudaHeadDimCount = static_cast<int>(std::size(kAttentionCudaHeadDims));

constexpr bool attention_cuda_supports_head_dim(int64_t head_dim) {
  for (const int d : kAttentionCudaHeadDims)
    if (d == head_dim) return true;
  return false;
}

}  // namespace loca_kernels
