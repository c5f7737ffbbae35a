// Every operator schema of loca_kernels, declared once. Kernels register their
// implementations per dispatch key next to their sources (csrc/<op>/cpu.cpp for
// CPU, csrc/<op>/bind_cuda.cpp for CUDA); autograd and fake (meta) functions are
// registered from Python (loca_kernels/<op>/operators.py), once for each operator
// and its Triton twin; the public function is loca_kernels/<op>/__init__.py.
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
  // query_size None: rule "centre", the reference patch under each query patch's centre.
  // query_size (rows, cols): rule "scenic", the official LOCA labels for query views of that many
  // pixels (as the network sees them): boxes are integer source pixels (read floored), each patch
  // reads the reference patch of the source pixel that TF's float32 nearest-neighbour resizes
  // (crop -> query_size -> query_grid; reference grid -> its crop) give it.
  m.def("relative_position_targets(Tensor query_boxes, Tensor ref_boxes, int[] query_grid, "
        "int[] ref_grid, Tensor query_flip, Tensor ref_flip, Tensor query_rot90, int ignore_index, "
        "int[]? query_size=None) -> Tensor");

  // One streaming pass of Sinkhorn (SPEC.md section 4) over scores (N, K), float32 results.
  // With x[i, j] = scores[i, j] * inv_epsilon - col_scale[j], p[i, j] = softmax_j(x[i, j]) when
  // normalize_rows, else exp(x[i, j]). Returns (result, shift): result is p (N, K) when write
  // (shift 0), else the column sums sum_i p[i, j] * exp(-shift) (K,), where shift (a 0-dim
  // tensor) is 0 for normalised rows and max_ij x[i, j] otherwise, which keeps them finite.
  // A row with a NaN or infinite x (a non-finite score, or a NaN col_scale) gives NaN in all of
  // its p and in every column sum, except in an unnormalised write: p = exp(x) entrywise there.
  m.def("sinkhorn_pass(Tensor scores, Tensor col_scale, float inv_epsilon, bool normalize_rows, bool write) "
        "-> (Tensor, Tensor)");

  // Nearest neighbours by cosine (SPEC.md section 6): a (B, Na, C), b (B, Nb, C), rows
  // L2-normalised as F.normalize(x, dim=-1, eps=1e-12). Returns (similarity, index): index int64
  // (B, Na), for each row of a the row of b of highest cosine (the lowest index on ties), and
  // similarity that cosine, float32 (float64 for float64 inputs), computed without a (B, Na, Nb)
  // tensor. (The public function returns them the other way round; the float output comes first
  // here because opcheck sums the outputs into the first one.)
  m.def("patch_matching(Tensor a, Tensor b) -> (Tensor similarity, Tensor index)");
  // The gradients of similarity in a and b through the chosen pairs (index is not
  // differentiable); grad_b sums the rows of a that chose each row of b in ascending order
  // (deterministic). Returns (grad_a, grad_b) in the inputs' dtypes.
  m.def("patch_matching_backward(Tensor grad_similarity, Tensor a, Tensor b, Tensor index) "
        "-> (Tensor grad_a, Tensor grad_b)");

  // Features of source regions seen from each view (SPEC.md section 7): roi_align (aligned,
  // spatial scale 1) of features[m] (M, C, h, w), turned back by -view_rot90[m] and unflipped,
  // over regions[m, r] (M, R, 4), mapped from source coordinates into view_boxes[m] (M, 4).
  // Boxes are read as float32; view_flip (M,) bool and view_rot90 (M,) int always given.
  // sampling_ratio > 0 samples per bin and axis, -1 ceil(region size / out size) as roi_align.
  // Returns (M, R, C, out_size[0], out_size[1]) in features' dtype.
  m.def("crop_features(Tensor features, Tensor view_boxes, Tensor regions, int[] out_size, Tensor view_flip, "
        "Tensor view_rot90, int sampling_ratio) -> Tensor");
  // The gradient of crop_features with respect to features (M, C, feature_size[0], feature_size[1]),
  // in grad_out's dtype; deterministic.
  m.def("crop_features_backward(Tensor grad_out, Tensor view_boxes, Tensor regions, int[] feature_size, "
        "Tensor view_flip, Tensor view_rot90, int sampling_ratio) -> Tensor");

  // InfoNCE against a queue of negatives (SPEC.md section 5), per row: with l_0 = query_i .
  // positive_i * inv_temperature and l_k = query_i . queue_k * inv_temperature (query, positive
  // (N, D), queue (K, D), K >= 0, any strides, one dtype), returns (loss, weighted): loss float32
  // (N,), loss_i = logsumexp(l_0, ..., l_K) - l_0; weighted float32 (N, D), the softmax-weighted
  // sum_{k >= 1} p_k queue_k with p = softmax(l_0, ..., l_K), from which the gradients follow
  // elementwise (loca_kernels/contrastive/operators.py), or (0, D) when not with_grad.
  m.def("queue_contrastive_forward(Tensor query, Tensor positive, Tensor queue, float inv_temperature, "
        "bool with_grad) -> (Tensor loss, Tensor weighted)");
}
