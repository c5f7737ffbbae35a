// Every operator schema of loca_kernels, declared once. Kernels register their
// implementations per dispatch key next to their sources (csrc/<op>/cpu.cpp for
// CPU, csrc/<op>/bind_cuda.cpp for CUDA); autograd and fake (meta) functions are
// registered from Python (loca_kernels/<op>/__init__.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "loca_kernels/attention.h"
#include "loca_kernels/cpu_math.h"

// Importing loca_kernels._C registers the operators; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(loca_kernels, m) {
  // The instruction set the C++ CPU kernels run with: "avx512", "avx2" or "baseline".
  m.def("cpu_isa() -> str", [] { return std::string(loca_kernels::cpu_isa_name(loca_kernels::cpu_isa())); });
  // The head dims D the CUDA attention kernels are compiled for (whether or not this build has
  // them: ask the dispatcher for that), from the one list in loca_kernels/attention.h.
  m.def("attention_cuda_head_dims() -> int[]", [] {
    return std::vector<int64_t>(std::begin(loca_kernels::kAttentionCudaHeadDims),
                                std::end(loca_kernels::kAttentionCudaHeadDims));
  });

  // Masked query-to-reference cross-attention (SPEC.md section 1), on compact keep lists:
  // query row i uses keep row i % R (R = keep_index.size(0), one of 1, Bk, Bq).
  // keep_is_run: keep_index[r, 0] is the first visible position of a consecutive run of
  // keep_count[r] tokens; otherwise keep_index[r, :keep_count[r]] are the visible positions.
  // keep_index and keep_count are int32. Returns (out, lse): lse is float32 (Bq, H, Nq),
  // the log-sum-exp of the scaled scores, -inf for a row with no visible token.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor keep_index, Tensor keep_count, "
        "bool keep_is_run, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v); grad_k and grad_v are summed over the views of a reference.
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor keep_index, Tensor keep_count, bool keep_is_run, float scale) -> (Tensor, Tensor, Tensor)");

  // Relative-position targets (SPEC.md section 3); flips and turns always given (zeros when unused).
  m.def("relative_position_targets(Tensor query_boxes, Tensor ref_boxes, int[] query_grid, "
        "int[] ref_grid, Tensor query_flip, Tensor ref_flip, Tensor query_rot90, int ignore_index) -> Tensor");

  // One streaming pass of Sinkhorn (SPEC.md section 4) over scores (N, K), float32 results.
  // With x[i, j] = scores[i, j] * inv_epsilon - col_scale[j], p[i, j] = softmax_j(x[i, j]) when
  // normalize_rows, else exp(x[i, j]). Returns (result, shift): result is p (N, K) when write
  // (shift 0), else the column sums sum_i p[i, j] * exp(-shift) (K,), where shift (a 0-dim
  // tensor) is 0 for normalised rows and max_ij x[i, j] otherwise, which keeps them finite.
  m.def("sinkhorn_pass(Tensor scores, Tensor col_scale, float inv_epsilon, bool normalize_rows, bool write) "
        "-> (Tensor, Tensor)");
}
