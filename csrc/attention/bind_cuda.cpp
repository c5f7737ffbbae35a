// Torch glue of the CUDA masked cross-attention kernels (csrc/attention/kernels.cu): argument
// checks, output allocation and the current stream. Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "loca_kernels/attention_cuda.h"

namespace loca_kernels {
namespace {

constexpr const char* kOp = "loca_kernels attention (cuda)";

AttentionDtype dtype_of(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return AttentionDtype::kFloat32;
    case at::kHalf: return AttentionDtype::kFloat16;
    case at::kBFloat16: return AttentionDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  return AttentionDtype::kFloat32;  // unreachable
}

// A (B, N, H, D) tensor on q's device and dtype with a contiguous last dim.
void check_bnhd(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, kOp, ": ", name, " must have 4 dimensions (B, N, H, D), got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.stride(3) == 1, kOp, ": ", name, " must be contiguous in its last dim, got strides ",
                    t.strides());
  for (int64_t dim = 0; dim < 4; ++dim)
    TORCH_CHECK_VALUE(t.size(dim) <= std::numeric_limits<int>::max(), kOp, ": ", name,
                      " is too large for the CUDA kernels: shape ", t.sizes());
}

AttentionTensor view_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Checks q, k, v and the keep tensors; returns the kernels' shape and keep form. `keep_index`
// is made contiguous (a small int32 tensor); the caller keeps it alive during the launch.
AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& keep_index, const at::Tensor& keep_count, bool keep_is_run,
                            AttentionKeep& keep) {
  TORCH_CHECK_VALUE(q.is_cuda(), kOp, ": q must be a CUDA tensor, got one on ", q.device());
  check_bnhd("q", q, q);
  check_bnhd("k", k, q);
  check_bnhd("v", v, q);
  dtype_of(q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  const int64_t bq = q.size(0), nq = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t bk = k.size(0), nk = k.size(1);
  TORCH_CHECK_VALUE(k.size(2) == heads && k.size(3) == head_dim, kOp, ": q has H=", heads, ", D=", head_dim,
                    " but k has H=", k.size(2), ", D=", k.size(3), "; they must match");
  TORCH_CHECK_VALUE(bk >= 1 && bq % bk == 0, kOp, ": Bq=", bq, " (q.shape[0]) must be a multiple of Bk=", bk,
                    " (k.shape[0])");
  TORCH_CHECK_VALUE(attention_cuda_supports_head_dim(head_dim), kOp, ": head dim D=", head_dim,
                    " is not supported; the CUDA kernels support D in (16, 32, 64, 128)");
  if (q.scalar_type() != at::kFloat) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
    TORCH_CHECK(major >= 8, kOp, ": the float16/bfloat16 kernels need compute capability 8.0 or newer, device ",
                q.device(), " has ", major, ".x");
  }

  TORCH_CHECK_TYPE(keep_index.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt, kOp,
                   ": keep_index and keep_count must be int32, got ", keep_index.scalar_type(), " and ",
                   keep_count.scalar_type());
  TORCH_CHECK_VALUE(keep_index.dim() == 2 && keep_count.dim() == 1 && keep_index.size(0) == keep_count.size(0),
                    kOp, ": keep_index must be (R, L) and keep_count (R,), got ", keep_index.sizes(), " and ",
                    keep_count.sizes());
  const int64_t rows = keep_index.size(0);
  TORCH_CHECK_VALUE(rows == 1 || rows == bk || rows == bq, kOp, ": keep must have R in (1, Bk=", bk, ", Bq=",
                    bq, ") rows, got ", rows);
  TORCH_CHECK_VALUE(!keep_is_run || keep_index.size(1) >= 1, kOp,
                    ": a run keep needs its start in keep_index[:, 0], got shape ", keep_index.sizes());
  TORCH_CHECK_VALUE(keep_index.size(1) <= nk, kOp, ": keep_index has ", keep_index.size(1),
                    " positions per row, more than Nk=", nk);
  TORCH_CHECK_VALUE(keep_index.device() == q.device() && keep_count.device() == q.device(), kOp,
                    ": keep_index and keep_count must be on ", q.device(), ", got ", keep_index.device(), " and ",
                    keep_count.device());
  keep_index = keep_index.contiguous();
  TORCH_CHECK_VALUE(keep_count.is_contiguous(), kOp, ": keep_count must be contiguous");

  keep.index = keep_index.data_ptr<int32_t>();
  keep.count = keep_count.data_ptr<int32_t>();
  keep.row_stride = keep_index.size(1);
  keep.length = keep_index.size(1);
  keep.rows = static_cast<int>(rows);
  keep.is_run = keep_is_run;
  return {static_cast<int>(bq), static_cast<int>(bk), static_cast<int>(nq), static_cast<int>(nk),
          static_cast<int>(heads), static_cast<int>(head_dim)};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& keep_index,
                                                          const at::Tensor& keep_count, bool keep_is_run,
                                                          double scale) {
  AttentionForwardParams params{};
  at::Tensor index = keep_index;
  params.shape = check_inputs(q, k, v, index, keep_count, keep_is_run, params.keep);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  params.dtype = dtype_of(q);
  params.scale = static_cast<float>(scale);
  params.q = view_of(q);
  params.k = view_of(k);
  params.v = view_of(v);
  params.out = view_of(out);
  params.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(launch_attention_forward(params, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& keep_index, const at::Tensor& keep_count,
    bool keep_is_run, double scale) {
  AttentionBackwardParams params{};
  at::Tensor index = keep_index;
  params.shape = check_inputs(q, k, v, index, keep_count, keep_is_run, params.keep);
  check_bnhd("grad_out", grad_out, q);
  check_bnhd("out", out, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kOp,
                    ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ",
                    out.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.device() == q.device() && lse.is_contiguous() &&
                        lse.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}),
                    kOp, ": lse must be a contiguous float32 (Bq, H, Nq) tensor on ", q.device(), ", got ",
                    lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  // Tokens no query row sees get zero gradients; the kernels write only the visible ones.
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  params.dtype = dtype_of(q);
  params.scale = static_cast<float>(scale);
  params.grad_out = view_of(grad_out);
  params.q = view_of(q);
  params.k = view_of(k);
  params.v = view_of(v);
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
