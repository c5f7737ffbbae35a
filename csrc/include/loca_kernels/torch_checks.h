// Shared by the torch glue of every op (csrc/<op>/cpu.cpp, bind_cuda.cpp and their checks.h;
// never by the torch-free .cu files): the one error prefix and the torch dtype -> Dtype map.
//
// Argument errors are TORCH_CHECK_VALUE (ValueError in Python) or TORCH_CHECK_TYPE (TypeError)
// and start with the prefix "loca_kernels.<operator> (<backend>)", e.g.
//   TORCH_CHECK_VALUE(ok, where, ": q must ...")  ->  "loca_kernels.attention_forward (cpu): q must ..."
#pragma once

#include <ATen/ATen.h>

#include <ostream>

#include "loca_kernels/dtype.h"

namespace loca_kernels {

// Who reports an error: the operator of csrc/ops.cpp and the backend ("cpu" or "cuda").
struct ErrorPrefix {
  const char* op;
  const char* backend;
};

inline std::ostream& operator<<(std::ostream& out, const ErrorPrefix& where) {
  return out << "loca_kernels." << where.op << " (" << where.backend << ")";
}

// The kernels' element type of `t` (float32, float16 or bfloat16); TypeError naming `name` otherwise.
inline Dtype kernel_dtype(const ErrorPrefix& where, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, where, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dtype);
  return dtype == at::kHalf ? Dtype::kFloat16 : dtype == at::kBFloat16 ? Dtype::kBFloat16 : Dtype::kFloat32;
}

// The same for the CPU kernels, which also take float64 (no Dtype: they dispatch on the torch dtype).
inline void check_cpu_float(const ErrorPrefix& where, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, where,
                   ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

}  // namespace loca_kernels
