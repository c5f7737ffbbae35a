// Masked cross-attention on the CPU (SPEC.md section 1, compact keep form of csrc/ops.cpp).
// One OpenMP task per (reference row b, head): it gathers the visible keys of each view
// of b into a small contiguous buffer, so masked tokens are never read, and in the
// backward it owns grad_k/grad_v of (b, head) and grad_q of the views of b: each output
// element is written by one task in a fixed order (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// Strided view of a (B, N, H, D) tensor whose last dim is contiguous.
template <typename T>
struct Tokens {
  T* data;
  int64_t sb, sn, sh;
  T* at(int64_t b, int64_t n, int64_t h) const { return data + b * sb + n * sn + h * sh; }
};

template <typename T>
Tokens<T> tokens(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Visible key positions of query row i.
struct Keep {
  const int32_t* index;
  const int32_t* count;
  int64_t rows, row_stride;
  bool is_run;
  void positions(int64_t i, std::vector<int64_t>& out) const {
    const int64_t r = i % rows;
    out.resize(count[r]);
    for (int64_t j = 0; j < count[r]; ++j) out[j] = is_run ? index[r * row_stride] + j : index[r * row_stride + j];
  }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep_index,
                  const at::Tensor& keep_count) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(), "q, k, v must be (B, N, H, D), k and v alike");
  TORCH_CHECK(q.size(2) == k.size(2) && q.size(3) == k.size(3), "q and k must share H and D");
  TORCH_CHECK(q.size(0) % k.size(0) == 0, "Bq must be a multiple of Bk");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v must be contiguous along D");
  TORCH_CHECK(keep_index.scalar_type() == at::kInt && keep_count.scalar_type() == at::kInt,
              "keep_index and keep_count must be int32");
  const int64_t rows = keep_index.size(0);
  TORCH_CHECK(keep_index.dim() == 2 && keep_count.dim() == 1 && keep_count.size(0) == rows &&
                  (rows == 1 || rows == k.size(0) || rows == q.size(0)),
              "keep_index must be (R, L) and keep_count (R,) with R in (1, Bk, Bq)");
}

Keep make_keep(const at::Tensor& keep_index, const at::Tensor& keep_count, bool is_run) {
  return {keep_index.data_ptr<int32_t>(), keep_count.data_ptr<int32_t>(), keep_index.size(0), keep_index.stride(0),
          is_run};
}

// Visible rows of x (b, :, h) gathered as a (L, D) buffer, or transposed as (D, L) so that
// the scores of one query against all keys are a loop over keys the compiler vectorises.
template <typename acc_t, typename scalar_t>
void gather_rows(const Tokens<scalar_t>& x, int64_t b, int64_t h, const std::vector<int64_t>& positions, int64_t d,
                 bool transposed, std::vector<acc_t>& out) {
  const int64_t n = positions.size();
  out.resize(n * d);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* row = x.at(b, positions[j], h);
    for (int64_t e = 0; e < d; ++e) out[transposed ? e * n + j : j * d + e] = static_cast<acc_t>(row[e]);
  }
}

template <typename acc_t, typename scalar_t>
void load_row(const scalar_t* row, int64_t d, std::vector<acc_t>& out) {
  out.resize(d);
  for (int64_t e = 0; e < d; ++e) out[e] = static_cast<acc_t>(row[e]);
}

// out[j] = sum_e row[e] * columns[e, j] for the (D, L) buffer `columns`.
template <typename acc_t>
void row_times_columns(const std::vector<acc_t>& row, const std::vector<acc_t>& columns, int64_t n, int64_t d,
                       std::vector<acc_t>& out) {
  out.assign(n, acc_t(0));
  for (int64_t e = 0; e < d; ++e) {
    const acc_t x = row[e];
    const acc_t* column = &columns[e * n];
    for (int64_t j = 0; j < n; ++j) out[j] += x * column[j];
  }
}

// Softmax of the scaled scores of one query row against the (D, L) keys, in `p`;
// returns the log-sum-exp (-inf when no key is visible).
template <typename acc_t>
acc_t softmax_row(const std::vector<acc_t>& q_row, const std::vector<acc_t>& keys_t, int64_t n_keys, int64_t d,
                  acc_t scale, std::vector<acc_t>& p) {
  row_times_columns(q_row, keys_t, n_keys, d, p);
  if (n_keys == 0) return -std::numeric_limits<acc_t>::infinity();
  acc_t peak = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) peak = std::max(peak, p[j] *= scale);
  acc_t total = 0;
  for (int64_t j = 0; j < n_keys; ++j) total += (p[j] = std::exp(p[j] - peak));
  for (int64_t j = 0; j < n_keys; ++j) p[j] /= total;
  return peak + std::log(total);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Keep& keep, double scale,
                    at::Tensor& out, at::Tensor& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t bq = q.size(0), nq = q.size(1), heads = q.size(2), d = q.size(3), bk = k.size(0);
  const auto Q = tokens<scalar_t>(q), K = tokens<scalar_t>(k), V = tokens<scalar_t>(v), O = tokens<scalar_t>(out);
  float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, bk * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positions;
    std::vector<acc_t> keys_t, values, q_row, p, acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      for (int64_t i = b; i < bq; i += bk) {
        keep.positions(i, positions);
        gather_rows(K, b, h, positions, d, true, keys_t);
        gather_rows(V, b, h, positions, d, false, values);
        const int64_t n_keys = positions.size();
        for (int64_t n = 0; n < nq; ++n) {
          load_row(Q.at(i, n, h), d, q_row);
          const acc_t row_lse = softmax_row(q_row, keys_t, n_keys, d, static_cast<acc_t>(scale), p);
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t j = 0; j < n_keys; ++j) {
            const acc_t pj = p[j];
            const acc_t* value = &values[j * d];
            for (int64_t e = 0; e < d; ++e) acc[e] += pj * value[e];
          }
          scalar_t* o = O.at(i, n, h);
          for (int64_t e = 0; e < d; ++e) o[e] = static_cast<scalar_t>(acc[e]);
          lse_p[(i * heads + h) * nq + n] = static_cast<float>(row_lse);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const Keep& keep, double scale, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t bq = q.size(0), nq = q.size(1), heads = q.size(2), d = q.size(3), bk = k.size(0), nk = k.size(1);
  const auto Q = tokens<scalar_t>(q), K = tokens<scalar_t>(k), V = tokens<scalar_t>(v);
  const auto dO = tokens<scalar_t>(grad_out), dQ = tokens<scalar_t>(grad_q);
  const auto dK = tokens<scalar_t>(grad_k), dV = tokens<scalar_t>(grad_v);
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, bk * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> positions;
    std::vector<acc_t> keys, keys_t, values_t, q_row, go_row, p, dp, dq(d), dk_sum, dv_sum;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      dk_sum.assign(nk * d, 0);  // dense over Nk: views may see different keys
      dv_sum.assign(nk * d, 0);
      for (int64_t i = b; i < bq; i += bk) {
        keep.positions(i, positions);
        gather_rows(K, b, h, positions, d, false, keys);
        gather_rows(K, b, h, positions, d, true, keys_t);
        gather_rows(V, b, h, positions, d, true, values_t);
        const int64_t n_keys = positions.size();
        for (int64_t n = 0; n < nq; ++n) {
          load_row(Q.at(i, n, h), d, q_row);
          load_row(dO.at(i, n, h), d, go_row);
          softmax_row(q_row, keys_t, n_keys, d, s, p);
          // dS_j = p_j (dO . v_j - sum_l p_l dO . v_l)
          row_times_columns(go_row, values_t, n_keys, d, dp);
          acc_t delta = 0;
          for (int64_t j = 0; j < n_keys; ++j) delta += p[j] * dp[j];
          std::fill(dq.begin(), dq.end(), acc_t(0));
          for (int64_t j = 0; j < n_keys; ++j) {
            const acc_t ds = p[j] * (dp[j] - delta) * s, pj = p[j];
            const acc_t* key = &keys[j * d];
            acc_t* dk_row = &dk_sum[positions[j] * d];
            acc_t* dv_row = &dv_sum[positions[j] * d];
            for (int64_t e = 0; e < d; ++e) {
              dq[e] += ds * key[e];
              dk_row[e] += ds * q_row[e];
              dv_row[e] += pj * go_row[e];
            }
          }
          scalar_t* gq = dQ.at(i, n, h);
          for (int64_t e = 0; e < d; ++e) gq[e] = static_cast<scalar_t>(dq[e]);
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        scalar_t* gk = dK.at(b, j, h);
        scalar_t* gv = dV.at(b, j, h);
        for (int64_t e = 0; e < d; ++e) {
          gk[e] = static_cast<scalar_t>(dk_sum[j * d + e]);
          gv[e] = static_cast<scalar_t>(dv_sum[j * d + e]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& keep_index,
                                                         const at::Tensor& keep_count, bool keep_is_run,
                                                         double scale) {
  check_inputs(q, k, v, keep_index, keep_count);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  const Keep keep = make_keep(keep_index, keep_count, keep_is_run);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(q, k, v, keep, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& /*out*/, const at::Tensor& /*lse*/, const at::Tensor& keep_index, const at::Tensor& keep_count,
    bool keep_is_run, double scale) {
  check_inputs(q, k, v, keep_index, keep_count);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.stride(3) == 1, "grad_out must be like q");
  at::Tensor grad_q = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor grad_k = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor grad_v = at::empty_like(v, at::MemoryFormat::Contiguous);
  const Keep keep = make_keep(keep_index, keep_count, keep_is_run);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, keep, scale, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}
