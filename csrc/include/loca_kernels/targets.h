// Relative-position targets on CUDA: plain launcher declaration, no torch (see
// csrc/targets/kernels.cu for the arithmetic, the reference's float64 one).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace loca_kernels {

struct TargetsParams {
  const double* query_boxes;   // (B, V, 4) contiguous
  const double* ref_boxes;     // (B, 4) contiguous
  const int8_t* query_flip;    // (B, V)
  const int8_t* ref_flip;      // (B,)
  const int32_t* query_rot90;  // (B, V), values in 0..3
  int64_t* out;                // (B, V, hq * wq)
  int64_t batch, views, hq, wq, hr, wr, ignore_index;
  int64_t ph, pw;              // rule "scenic": query views' pixel size (as seen); 0: rule "centre"
};

cudaError_t launch_relative_position_targets(const TargetsParams& params, cudaStream_t stream);

}  // namespace loca_kernels
