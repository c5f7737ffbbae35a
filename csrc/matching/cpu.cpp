// Patch matching on the CPU (SPEC.md section 6): for each row of a, the row of b of highest
// cosine, without a (B, Na, Nb) tensor.
//
// Forward: one pass writes the rows of b normalised as F.normalize does (x / max(|x|, eps)) in
// the accumulation type, zero-padded to a multiple of one 64-byte vector (an O(B Nb C) copy, the
// size of b). Then one task per (batch element, block of kRows rows of a) normalises its rows
// the same way and takes their dot products with every row of b in a register tile of lane
// partial sums (vectorised), keeping a running maximum with a strict > so that the lowest index
// wins ties, as torch.argmax. Float32 accumulation (float64 for float64 inputs).
//
// Backward, through sim_i = <a_i / d_i, b_j / e_j> for the chosen j = index_i (d, e the clamped
// norms): grad_a_i = g_i / d_i (b_j / e_j - [|a_i| >= eps] sim_i a_i / d_i), and grad_b_j the
// same expression with a and b swapped, summed over the rows i that chose j. The rows of a are
// grouped by the row of b they chose (a stable counting sort per batch element), and one task
// per row of b sums its group in ascending i: deterministic, no atomics, independent of the
// number of threads. The gate [|x| >= eps] is F.normalize's: clamp_min passes no gradient to
// the norm of a vector shorter than eps (a zero vector gets grad g * other / eps).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "loca_kernels/cpu_math.h"
#include "loca_kernels/torch_checks.h"

namespace {

constexpr double kEps = 1e-12;  // F.normalize's default

// float64 accumulates in float64, every other dtype in float32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Lanes of one 64-byte vector: rows of the normalised buffers are padded to a multiple of it.
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

// Rows of a per forward task: each row of b is read once per block.
constexpr int64_t kRows = 4;

// Strided view of a (B, N, C) tensor.
template <typename T>
struct Rows {
  const T* data;
  int64_t sb, sn, sc;
  const T* at(int64_t b, int64_t n) const { return data + b * sb + n * sn; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// max(|x|, eps) of one row of C values read with stride sc, in acc_t.
template <typename acc_t, typename scalar_t>
acc_t clamped_norm(const scalar_t* x, int64_t sc, int64_t c, acc_t* squared_norm = nullptr) {
  acc_t sum = 0;
  for (int64_t k = 0; k < c; ++k) {
    const acc_t v = static_cast<acc_t>(x[k * sc]);
    sum += v * v;
  }
  const acc_t norm = std::sqrt(sum);
  if (squared_norm) *squared_norm = sum;
  return norm > acc_t(kEps) ? norm : acc_t(kEps);
}

// out[0 .. padded) = x / max(|x|, eps), zeros after C.
template <typename acc_t, typename scalar_t>
void normalise_row(const scalar_t* x, int64_t sc, int64_t c, int64_t padded, acc_t* out) {
  const acc_t denom = clamped_norm<acc_t>(x, sc, c);
  for (int64_t k = 0; k < c; ++k) out[k] = static_cast<acc_t>(x[k * sc]) / denom;
  for (int64_t k = c; k < padded; ++k) out[k] = 0;
}

// The hot loop: dots of `rows` (<= kRows) normalised rows of a (stride cp) with every row of
// the normalised b (nb rows, stride cp), running max and argmax per row (strict >).
template <typename acc_t>
inline void best_matches(const acc_t* an, int64_t rows, const acc_t* bn, int64_t nb, int64_t cp, acc_t* best,
                         int64_t* best_index) {
  constexpr int64_t kW = kLanes<acc_t>;
  for (int64_t r = 0; r < kRows; ++r) best[r] = -std::numeric_limits<acc_t>::infinity(), best_index[r] = 0;
  for (int64_t j = 0; j < nb; ++j) {
    const acc_t* bj = bn + j * cp;
    acc_t part[kRows][kW] = {};
    for (int64_t k = 0; k < cp; k += kW)
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t l = 0; l < kW; ++l) part[r][l] += an[r * cp + k + l] * bj[k + l];
    for (int64_t r = 0; r < rows; ++r) {
      acc_t dot = 0;
      for (int64_t l = 0; l < kW; ++l) dot += part[r][l];
      // NaN beats every number and the first NaN stays, as torch.argmax (SPEC.md section 6).
      if ((dot > best[r] || dot != dot) && best[r] == best[r]) best[r] = dot, best_index[r] = j;
    }
  }
}

#if defined(LOCA_KERNELS_X86_VARIANTS)
template <typename acc_t>
LOCA_TARGET_AVX512 void best_matches_avx512(const acc_t* an, int64_t rows, const acc_t* bn, int64_t nb, int64_t cp,
                                            acc_t* best, int64_t* best_index) {
  best_matches(an, rows, bn, nb, cp, best, best_index);
}
template <typename acc_t>
LOCA_TARGET_AVX2 void best_matches_avx2(const acc_t* an, int64_t rows, const acc_t* bn, int64_t nb, int64_t cp,
                                        acc_t* best, int64_t* best_index) {
  best_matches(an, rows, bn, nb, cp, best, best_index);
}
#endif
template <typename acc_t>
__attribute__((flatten)) void best_matches_baseline(const acc_t* an, int64_t rows, const acc_t* bn, int64_t nb,
                                                    int64_t cp, acc_t* best, int64_t* best_index) {
  best_matches(an, rows, bn, nb, cp, best, best_index);
}

// a (B, Na, C) and b (B, Nb, C) on the CPU, of one float dtype, with Na, Nb, C >= 1.
void check_inputs(const loca_kernels::ErrorPrefix& where, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, where, ": a and b must be (B, N, C), got sizes ", a.sizes(),
                    " and ", b.sizes());
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), where, ": a and b must be on the CPU, got ",
                    a.device(), " and ", b.device());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), where, ": a and b must share one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  loca_kernels::check_cpu_float(where, "a", a);
  TORCH_CHECK_VALUE(a.size(0) == b.size(0) && a.size(2) == b.size(2), where, ": a and b must share B and C, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(1) > 0 && b.size(1) > 0 && a.size(2) > 0, where, ": Na, Nb and C must be >= 1, got a ",
                    a.sizes(), " and b ", b.sizes());
}

std::tuple<at::Tensor, at::Tensor> patch_matching_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_inputs({"patch_matching", "cpu"}, a, b);
  const int64_t batch = a.size(0), na = a.size(1), nb = b.size(1), c = a.size(2);
  const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor index = at::empty({batch, na}, a.options().dtype(at::kLong));
  at::Tensor similarity = at::empty({batch, na}, a.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "patch_matching_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t cp = (c + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
    const Rows<scalar_t> ra = rows_of<scalar_t>(a), rb = rows_of<scalar_t>(b);
    at::Tensor b_normalised = at::empty({batch * nb * cp}, a.options().dtype(acc_dtype));
    acc_t* bn = b_normalised.data_ptr<acc_t>();
    at::parallel_for(0, batch * nb, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        normalise_row(rb.at(row / nb, row % nb), rb.sc, c, cp, bn + row * cp);
    });
    const auto run = LOCA_CPU_VARIANT(best_matches, <acc_t>);
    int64_t* index_out = index.data_ptr<int64_t>();
    acc_t* similarity_out = similarity.data_ptr<acc_t>();
    const int64_t blocks = (na + kRows - 1) / kRows;
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> an(kRows * cp, acc_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / blocks, first = task % blocks * kRows;
        const int64_t rows = std::min(kRows, na - first);
        for (int64_t r = 0; r < rows; ++r) normalise_row(ra.at(bi, first + r), ra.sc, c, cp, an.data() + r * cp);
        acc_t best[kRows];
        int64_t best_index[kRows];
        run(an.data(), rows, bn + bi * nb * cp, nb, cp, best, best_index);
        for (int64_t r = 0; r < rows; ++r) {
          index_out[bi * na + first + r] = best_index[r];
          similarity_out[bi * na + first + r] = best[r];
        }
      }
    });
  });
  return {similarity, index};
}

std::tuple<at::Tensor, at::Tensor> patch_matching_backward_cpu(const at::Tensor& grad_similarity,
                                                               const at::Tensor& a, const at::Tensor& b,
                                                               const at::Tensor& index) {
  const loca_kernels::ErrorPrefix where{"patch_matching_backward", "cpu"};
  check_inputs(where, a, b);
  const int64_t batch = a.size(0), na = a.size(1), nb = b.size(1), c = a.size(2);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, where, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sizes() == at::IntArrayRef({batch, na}), where, ": index must be (B, Na) = (", batch, ", ",
                    na, "), got ", index.sizes());
  TORCH_CHECK_VALUE(grad_similarity.sizes() == at::IntArrayRef({batch, na}), where,
                    ": grad_similarity must be (B, Na) = (", batch, ", ", na, "), got ", grad_similarity.sizes());
  TORCH_CHECK_VALUE(grad_similarity.device().is_cpu() && index.device().is_cpu(), where,
                    ": grad_similarity and index must be on the CPU, got ", grad_similarity.device(), " and ",
                    index.device());
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < batch * na; ++n)
    TORCH_CHECK_VALUE(ip[n] >= 0 && ip[n] < nb, where, ": index values must lie in [0, Nb = ", nb, "), got ", ip[n]);
  at::Tensor grad_a = at::empty(a.sizes(), a.options());
  at::Tensor grad_b = at::empty(b.sizes(), b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "patch_matching_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor g = grad_similarity.to(acc_dtype).contiguous();
    const acc_t* gp = g.data_ptr<acc_t>();
    const Rows<scalar_t> ra = rows_of<scalar_t>(a), rb = rows_of<scalar_t>(b);
    scalar_t* grad_ap = grad_a.data_ptr<scalar_t>();
    scalar_t* grad_bp = grad_b.data_ptr<scalar_t>();
    const acc_t eps = acc_t(kEps);
    // Per row of a: w = g / d (so that g a / d = w a) and u = g sim, the terms the chosen row of
    // b sums; per row of b: its clamped norm.
    std::vector<acc_t> w(batch * na), u(batch * na), b_denom(batch * nb);
    std::vector<uint8_t> b_gate(batch * nb);
    at::parallel_for(0, batch * nb, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        acc_t squared;
        b_denom[row] = clamped_norm<acc_t>(rb.at(row / nb, row % nb), rb.sc, c, &squared);
        b_gate[row] = std::sqrt(squared) >= eps;
      }
    });
    at::parallel_for(0, batch * na, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / na, j = ip[row];
        const scalar_t* ai = ra.at(bi, row % na);
        const scalar_t* bj = rb.at(bi, j);
        acc_t squared;
        const acc_t d = clamped_norm<acc_t>(ai, ra.sc, c, &squared), e = b_denom[bi * nb + j];
        const bool gate = std::sqrt(squared) >= eps;
        acc_t sim = 0;
        for (int64_t k = 0; k < c; ++k)
          sim += (static_cast<acc_t>(ai[k * ra.sc]) / d) * (static_cast<acc_t>(bj[k * rb.sc]) / e);
        const acc_t scale = gp[row] / d, along = gate ? sim : acc_t(0);
        scalar_t* out = grad_ap + row * c;
        for (int64_t k = 0; k < c; ++k)
          out[k] = static_cast<scalar_t>(
              scale * (static_cast<acc_t>(bj[k * rb.sc]) / e - along * static_cast<acc_t>(ai[k * ra.sc]) / d));
        w[row] = scale;
        u[row] = gp[row] * sim;
      }
    });
    // Rows of a grouped by the row of b they chose, ascending within a group (counting sort).
    std::vector<int64_t> start(batch * nb + 1, 0), order(batch * na);
    for (int64_t row = 0; row < batch * na; ++row) ++start[row / na * nb + ip[row] + 1];
    for (int64_t n = 0; n < batch * nb; ++n) start[n + 1] += start[n];
    {
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (int64_t row = 0; row < batch * na; ++row) order[next[row / na * nb + ip[row]]++] = row;
    }
    at::parallel_for(0, batch * nb, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(c);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / nb;
        std::fill(sum.begin(), sum.end(), acc_t(0));
        acc_t along = 0;
        for (int64_t n = start[row]; n < start[row + 1]; ++n) {
          const int64_t i = order[n];
          const scalar_t* ai = ra.at(bi, i % na);
          for (int64_t k = 0; k < c; ++k) sum[k] += w[i] * static_cast<acc_t>(ai[k * ra.sc]);
          along += u[i];
        }
        // grad_b_j = (sum_i w_i a_i - gate_j (sum_i u_i) b_j / e_j) / e_j
        const acc_t e = b_denom[row], gated = b_gate[row] ? along : acc_t(0);
        const scalar_t* bj = rb.at(bi, row % nb);
        scalar_t* out = grad_bp + row * c;
        for (int64_t k = 0; k < c; ++k)
          out[k] = static_cast<scalar_t>((sum[k] - gated * static_cast<acc_t>(bj[k * rb.sc]) / e) / e);
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("patch_matching", &patch_matching_cpu);
  m.impl("patch_matching_backward", &patch_matching_backward_cpu);
}
