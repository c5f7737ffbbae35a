// Argument checks of attention_forward and attention_backward (csrc/ops.cpp) shared by the CPU
// (cpu.cpp) and CUDA (bind_cuda.cpp) kernels: shapes, dtypes, devices and the form of the keep
// tensors. What only one backend needs stays with it: the dtypes it takes, the keep values
// (CPU: read on the host, so a direct caller cannot make it read out of bounds), the head dims
// and int32 sizes (CUDA).
#pragma once

#include <ATen/ATen.h>

#include "loca_kernels/torch_checks.h"

namespace loca_kernels {

// A (B, N, H, D) tensor on q's device, in q's dtype, contiguous along D.
inline void check_attention_tokens(const ErrorPrefix& where, const char* name, const at::Tensor& t,
                                   const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4, where, ": ", name, " must have 4 dimensions (B, N, H, D), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), where, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), where, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, where, ": ", name,
                    " must be contiguous along D (its last dim), got strides ", t.strides());
}

// Checks q, k, v and the keep tensors (their form, not their values) of a kernel for `device`
// tensors. Returns keep_index made contiguous (a small int32 tensor), which the caller keeps
// alive while the kernel runs.
inline at::Tensor check_attention_inputs(const ErrorPrefix& where, c10::DeviceType device, const at::Tensor& q,
                                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep_index,
                                         const at::Tensor& keep_count, bool keep_is_run) {
  TORCH_CHECK_VALUE(q.device().type() == device, where, ": q must be a ", c10::DeviceTypeName(device),
                    " tensor, got one on ", q.device());
  check_attention_tokens(where, "q", q, q);
  check_attention_tokens(where, "k", k, q);
  check_attention_tokens(where, "v", v, q);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), where, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t bq = q.size(0), bk = k.size(0), nk = k.size(1);
  TORCH_CHECK_VALUE(k.size(2) == q.size(2) && k.size(3) == q.size(3), where, ": q has H=", q.size(2), ", D=",
                    q.size(3), " but k has H=", k.size(2), ", D=", k.size(3), "; they must match");
  TORCH_CHECK_VALUE(bk >= 1 && bq % bk == 0, where, ": Bq=", bq, " (q.shape[0]) must be a multiple of Bk=", bk,
                    " (k.shape[0])");

  TORCH_CHECK_TYPE(keep_index.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt, where,
                   ": keep_index and keep_count must be int32, got ", keep_index.scalar_type(), " and ",
                   keep_count.scalar_type());
  TORCH_CHECK_VALUE(keep_index.device() == q.device() && keep_count.device() == q.device(), where,
                    ": keep_index and keep_count must be on ", q.device(), ", got ", keep_index.device(), " and ",
                    keep_count.device());
  TORCH_CHECK_VALUE(keep_index.dim() == 2 && keep_count.dim() == 1 && keep_index.size(0) == keep_count.size(0),
                    where, ": keep_index must be (R, L) and keep_count (R,), got ", keep_index.sizes(), " and ",
                    keep_count.sizes());
  const int64_t rows = keep_index.size(0), width = keep_index.size(1);
  TORCH_CHECK_VALUE(rows == 1 || rows == bk || rows == bq, where, ": keep must have R in (1, Bk=", bk, ", Bq=", bq,
                    ") rows, got ", rows);
  TORCH_CHECK_VALUE(!keep_is_run || width >= 1, where, ": a run keep needs its start in keep_index[:, 0], got shape ",
                    keep_index.sizes());
  TORCH_CHECK_VALUE(width <= nk, where, ": keep_index has ", width, " positions per row, more than Nk=", nk);
  TORCH_CHECK_VALUE(keep_count.is_contiguous(), where, ": keep_count must be contiguous, got strides ",
                    keep_count.strides());
  return keep_index.contiguous();
}

// The further inputs of attention_backward: grad_out and out of q's shape (and device, dtype),
// lse the forward's float32 (Bq, H, Nq), contiguous.
inline void check_attention_backward_inputs(const ErrorPrefix& where, const at::Tensor& q, const at::Tensor& grad_out,
                                            const at::Tensor& out, const at::Tensor& lse) {
  check_attention_tokens(where, "grad_out", grad_out, q);
  check_attention_tokens(where, "out", out, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), where,
                    ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ",
                    out.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, where, ": lse must be float32, got ", lse.scalar_type());
  const int64_t lse_shape[] = {q.size(0), q.size(2), q.size(1)};
  TORCH_CHECK_VALUE(lse.device() == q.device() && lse.is_contiguous() && lse.sizes() == at::IntArrayRef(lse_shape),
                    where, ": lse must be a contiguous (Bq, H, Nq) = ", at::IntArrayRef(lse_shape), " tensor on ",
                    q.device(), ", got ", lse.sizes(), " on ", lse.device());
}

}  // namespace loca_kernels
