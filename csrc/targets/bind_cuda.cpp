// Torch glue of the CUDA relative-position targets kernel (csrc/targets/kernels.cu): argument
// checks, the small per-view conversions, output allocation and the current stream.
// Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "loca_kernels/targets.h"

namespace loca_kernels {
namespace {

at::Tensor relative_position_targets_cuda(const at::Tensor& query_boxes, const at::Tensor& ref_boxes,
                                          at::IntArrayRef query_grid, at::IntArrayRef ref_grid,
                                          const at::Tensor& query_flip, const at::Tensor& ref_flip,
                                          const at::Tensor& query_rot90, int64_t ignore_index,
                                          at::OptionalIntArrayRef query_size) {
  check_targets_inputs({"relative_position_targets", "cuda"}, query_boxes, ref_boxes, query_grid, ref_grid,
                       query_flip, ref_flip, query_rot90, query_size);
  const int64_t batch = query_boxes.size(0), views = query_boxes.size(1);
  const c10::cuda::CUDAGuard guard(query_boxes.device());
  // Per-view inputs are tiny: converting them keeps one arithmetic (float64) and one layout.
  const at::Tensor qb = query_boxes.to(at::kDouble).contiguous();
  const at::Tensor rb = ref_boxes.to(at::kDouble).contiguous();
  const at::Tensor qf = query_flip.to(at::kChar).contiguous();
  const at::Tensor rf = ref_flip.to(at::kChar).contiguous();
  const at::Tensor qr = query_rot90.to(at::kInt).contiguous();
  at::Tensor out = at::empty({batch, views, query_grid[0] * query_grid[1]}, qb.options().dtype(at::kLong));
  TargetsParams params{qb.data_ptr<double>(), rb.data_ptr<double>(), qf.data_ptr<int8_t>(), rf.data_ptr<int8_t>(),
                       qr.data_ptr<int32_t>(), out.data_ptr<int64_t>(), batch, views, query_grid[0], query_grid[1],
                       ref_grid[0], ref_grid[1], ignore_index, query_size.has_value() ? (*query_size)[0] : 0,
                       query_size.has_value() ? (*query_size)[1] : 0};
  C10_CUDA_CHECK(launch_relative_position_targets(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace loca_kernels

TORCH_LIBRARY_IMPL(loca_kernels, CUDA, m) {
  m.impl("relative_position_targets", &loca_kernels::relative_position_targets_cuda);
}
