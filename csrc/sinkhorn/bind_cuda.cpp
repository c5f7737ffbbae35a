// Torch glue of the CUDA Sinkhorn pass (csrc/sinkhorn/kernels.cu): argument checks, output and
// workspace allocation and the current stream. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "loca_kernels/sinkhorn.h"

namespace loca_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> sinkhorn_pass_cuda(const at::Tensor& scores, const at::Tensor& col_scale,
                                                      double inv_epsilon, bool normalize_rows, bool write) {
  const ErrorPrefix where{"sinkhorn_pass", "cuda"};
  check_sinkhorn_inputs(where, scores, col_scale);
  const Dtype dtype = kernel_dtype(where, "scores", scores);
  const int64_t n = scores.size(0), k = scores.size(1);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor cols = col_scale.contiguous();
  const auto options = cols.options();
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, scores.get_device()));
  const int64_t blocks = sinkhorn_pass_blocks(n, multiprocessors);
  at::Tensor result = write ? at::empty({n, k}, options) : at::empty({k}, options);
  at::Tensor shift = write ? at::zeros({}, options) : at::empty({}, options);
  // Per block: its column sums (blocks, K), then its shift (blocks,); the kernel initialises both.
  at::Tensor workspace = at::empty({write ? 0 : blocks * (k + 1)}, options);
  float* partial = write ? nullptr : workspace.data_ptr<float>();
  SinkhornPassParams params{scores.data_ptr(), dtype, cols.data_ptr<float>(), result.data_ptr<float>(),
                            shift.data_ptr<float>(), partial, write ? nullptr : partial + blocks * k, n, k,
                            scores.stride(0), blocks, static_cast<float>(inv_epsilon), normalize_rows, write};
  C10_CUDA_CHECK(launch_sinkhorn_pass(params, c10::cuda::getCurrentCUDAStream()));
  return {result, shift};
}

}  // namespace
}  // namespace loca_kernels

TORCH_LIBRARY_IMPL(loca_kernels, CUDA, m) {
  m.impl("sinkhorn_pass", &loca_kernels::sinkhorn_pass_cuda);
}
