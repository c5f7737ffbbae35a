// Torch glue of the CUDA masked cross-attention kernels (csrc/attention/kernels.cu): argument
// checks (checks.h, shared with cpu.cpp, then the CUDA kernels' own limits), output allocation
// and the current stream. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "checks.h"
#include "loca_kernels/attention_cuda.h"

namespace loca_kernels {
namespace {

AttentionTensor view_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Checks the inputs and fills what the forward and backward params share (shape, keep, dtype,
// scale, q, k, v). Returns keep_index made contiguous, which must outlive the launch.
template <class Params>
at::Tensor fill_inputs(Params& params, const ErrorPrefix& where, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& keep_index, const at::Tensor& keep_count,
                       bool keep_is_run, double scale) {
  at::Tensor index = check_attention_inputs(where, c10::kCUDA, q, k, v, keep_index, keep_count, keep_is_run);
  params.dtype = kernel_dtype(where, "q", q);
  const auto fits_int = [](const at::Tensor& t) {  // the kernels count in int (v has k's shape)
    return *std::max_element(t.sizes().begin(), t.sizes().end()) <= std::numeric_limits<int>::max();
  };
  TORCH_CHECK_VALUE(fits_int(q) && fits_int(k), where, ": q ", q.sizes(), " and k ", k.sizes(),
                    " are too large for the CUDA kernels: every size must fit in int32");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(attention_cuda_supports_head_dim(head_dim), where, ": head dim D=", head_dim,
                    " is not supported; the CUDA kernels support D in ", c10::ArrayRef<int>(kAttentionCudaHeadDims));
  if (params.dtype != Dtype::kFloat32) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
    // A limit of the device, not of the arguments: RuntimeError.
    TORCH_CHECK(major >= 8, where, ": the float16/bfloat16 kernels need compute capability 8.0 or newer, device ",
                q.device(), " has ", major, ".x");
  }
  params.shape = {static_cast<int>(q.size(0)), static_cast<int>(k.size(0)), static_cast<int>(q.size(1)),
                  static_cast<int>(k.size(1)), static_cast<int>(q.size(2)), static_cast<int>(head_dim)};
  params.keep = {index.data_ptr<int32_t>(), keep_count.data_ptr<int32_t>(), index.size(1), index.size(1),
                 static_cast<int>(index.size(0)), keep_is_run};
  params.scale = static_cast<float>(scale);
  params.q = view_of(q);
  params.k = view_of(k);
  params.v = view_of(v);
  return index;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& keep_index,
                                                          const at::Tensor& keep_count, bool keep_is_run,
                                                          double scale) {
  const ErrorPrefix where{"attention_forward", "cuda"};
  AttentionForwardParams params{};
  const at::Tensor index = fill_inputs(params, where, q, k, v, keep_index, keep_count, keep_is_run, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  params.out = view_of(out);
  params.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(launch_attention_forward(params, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& keep_index, const at::Tensor& keep_count,
    bool keep_is_run, double scale) {
  const ErrorPrefix where{"attention_backward", "cuda"};
  AttentionBackwardParams params{};
  const at::Tensor index = fill_inputs(params, where, q, k, v, keep_index, keep_count, keep_is_run, scale);
  check_attention_backward_inputs(where, q, grad_out, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  // Tokens no query row sees get zero gradients; the kernels write only the visible ones.
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  params.grad_out = view_of(grad_out);
  params.out = view_of(out);
  params.lse = lse.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.grad_q = view_of(grad_q);
  params.grad_k = view_of(grad_k);
  params.grad_v = view_of(grad_v);
  C10_CUDA_CHECK(launch_attention_backward(params, c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace loca_kernels

TORCH_LIBRARY_IMPL(loca_kernels, CUDA, m) {
  m.impl("attention_forward", &loca_kernels::attention_forward_cuda);
  m.impl("attention_backward", &loca_kernels::attention_backward_cuda);
}
