// Masked cross-attention on the CPU (SPEC.md section 1, compact keep form of csrc/ops.cpp).
//
// The visible keys and values of one (reference row b, head h) are gathered once into small
// contiguous buffers in the accumulation type (masked tokens are never read) and reused by
// every view of b that sees the same keep row. A block of query rows is then a few small
// matrix products on those buffers (scores, softmax, P V), computed in register tiles whose
// loops the compiler vectorises. The hot loops are compiled for AVX-512, AVX2 + FMA and the
// baseline instruction set, chosen at run time.
//
// Forward: one task per (b, h, view); consecutive views of one (b, h) run on one thread and
// share its gathered buffers. Backward: one task per (b, h) owns grad_k and grad_v of (b, h)
// and grad_q of every view of b, summing over the views in order. Every output element is
// written by one task in a fixed order: deterministic, no atomics, independent of the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "loca_kernels/cpu_math.h"

namespace {

// float64 accumulates in float64, every other dtype in float32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Buffer rows are padded to a multiple of one 64-byte vector.
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

template <typename acc_t>
int64_t padded(int64_t n) {
  return (n + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t>;
}

// Query rows per block: a block's scores (kQueryBlock x visible keys) stay in cache.
constexpr int64_t kQueryBlock = 64;

// Per instruction set (IsaTile<kIsa> in LOCA_CPU_VARIANTS below): the native vector (kVectorBytes) and the
// register tile of the matrix products, kTileRows x kTileVectors vectors of accumulators
// (8 of the 32 zmm registers of AVX-512, 8 of the 16 ymm of AVX2, 8 of the 16 xmm of SSE2).
template <loca_kernels::CpuIsa>
struct IsaTile;
template <>
struct IsaTile<loca_kernels::CpuIsa::kBaseline> {
  static constexpr int64_t kVectorBytes = 16, kTileRows = 4, kTileVectors = 2;
};
template <>
struct IsaTile<loca_kernels::CpuIsa::kAvx2> {
  static constexpr int64_t kVectorBytes = 32, kTileRows = 4, kTileVectors = 2;
};
template <>
struct IsaTile<loca_kernels::CpuIsa::kAvx512> {
  static constexpr int64_t kVectorBytes = 64, kTileRows = 4, kTileVectors = 2;
};

template <typename T, int64_t kBytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(kBytes)));
};

inline float exp_of(float x) { return loca_kernels::fast_exp(x); }
inline double exp_of(double x) { return std::exp(x); }
inline float max_of(float a, float b) { return loca_kernels::max_of(a, b); }
inline double max_of(double a, double b) { return a > b ? a : b; }

// One register tile of C = A B: C[r, :kVectors * width] = (accumulate ? C : 0) + sum_k A(r, k) B[k, :]
// for r < kTileRows, with A(r, k) = a[r * a_row + k * a_col]. Written on the compiler's vector
// type so that the accumulators stay in registers whatever the target.
template <class Isa, int64_t kVectors, typename acc_t>
inline void tile(const acc_t* a, int64_t a_row, int64_t a_col, const acc_t* b, int64_t ldb, acc_t* c, int64_t ldc,
                 int64_t depth, bool accumulate) {
#ifdef __clang__
#pragma clang fp contract(fast)
#endif
  using Vector = typename VectorOf<acc_t, Isa::kVectorBytes>::type;
  constexpr int64_t kRows = Isa::kTileRows, kWidth = Isa::kVectorBytes / sizeof(acc_t);
  Vector sum[kRows][kVectors] = {};
  if (accumulate)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t v = 0; v < kVectors; ++v) std::memcpy(&sum[r][v], c + r * ldc + v * kWidth, sizeof(Vector));
  for (int64_t k = 0; k < depth; ++k) {
    Vector b_row[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) std::memcpy(&b_row[v], b + k * ldb + v * kWidth, sizeof(Vector));
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t x = a[r * a_row + k * a_col];
      for (int64_t v = 0; v < kVectors; ++v) sum[r][v] = b_row[v] * x + sum[r][v];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVectors; ++v) std::memcpy(c + r * ldc + v * kWidth, &sum[r][v], sizeof(Vector));
}

// C (rows x cols, leading dim ldc) = (accumulate ? C : 0) + A (rows x depth) B (depth x cols,
// leading dim ldb), A read through strides (a_row, a_col) so that a transposed A costs
// nothing. rows is a multiple of Isa::kTileRows and cols of kLanes.
template <class Isa, typename acc_t>
inline void matmul(const acc_t* a, int64_t a_row, int64_t a_col, const acc_t* b, int64_t ldb, acc_t* c, int64_t ldc,
                   int64_t rows, int64_t depth, int64_t cols, bool accumulate) {
  constexpr int64_t kWidth = Isa::kVectorBytes / sizeof(acc_t), kWide = Isa::kTileVectors * kWidth;
  for (int64_t r = 0; r < rows; r += Isa::kTileRows) {
    const acc_t* a_rows = a + r * a_row;
    acc_t* c_rows = c + r * ldc;
    int64_t j = 0;
    for (; j + kWide <= cols; j += kWide)
      tile<Isa, Isa::kTileVectors>(a_rows, a_row, a_col, b + j, ldb, c_rows + j, ldc, depth, accumulate);
    for (; j < cols; j += kWidth) tile<Isa, 1>(a_rows, a_row, a_col, b + j, ldb, c_rows + j, ldc, depth, accumulate);
  }
}

// Sum of row[0 .. n) with n a multiple of kLanes, in kLanes partial sums (vectorises).
template <typename acc_t>
inline acc_t lane_sum(const acc_t* row, const acc_t* other, int64_t n) {
  constexpr int64_t kW = kLanes<acc_t>;
  acc_t part[kW] = {};
  for (int64_t j = 0; j < n; j += kW)
    for (int64_t l = 0; l < kW; ++l) part[l] += other ? row[j + l] * other[j + l] : row[j + l];
  acc_t total = 0;
  for (int64_t l = 0; l < kW; ++l) total += part[l];
  return total;
}

// In place, each of `rows` rows of s (leading dim lp, `count` visible keys, padding after):
// scaled scores -> softmax, padding set to 0; lse[r] = log-sum-exp of the scaled scores.
// A row with a NaN or infinite scaled score is all NaN (SPEC.md section 1): the row's sum of
// score * 0 (0, or NaN), taken in the scaling loop, is added to its weight and its lse.
template <typename acc_t>
inline void softmax_rows(acc_t* s, int64_t rows, int64_t count, int64_t lp, acc_t scale, acc_t* lse) {
  constexpr int64_t kW = kLanes<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = s + r * lp;
    acc_t nans[kW] = {};
    for (int64_t j = 0; j < lp; j += kW)
      for (int64_t l = 0; l < kW; ++l) {
        row[j + l] *= scale;
        nans[l] += j + l < count ? row[j + l] * acc_t(0) : acc_t(0);
      }
    acc_t nan = 0;
    for (int64_t l = 0; l < kW; ++l) nan += nans[l];
    for (int64_t j = count; j < lp; ++j) row[j] = kNegInf;
    acc_t peaks[kW];
    for (int64_t l = 0; l < kW; ++l) peaks[l] = kNegInf;
    for (int64_t j = 0; j < lp; j += kW)
      for (int64_t l = 0; l < kW; ++l) peaks[l] = max_of(peaks[l], row[j + l]);
    acc_t peak = kNegInf;
    for (int64_t l = 0; l < kW; ++l) peak = max_of(peak, peaks[l]);
    for (int64_t j = 0; j < lp; ++j) row[j] = exp_of(row[j] - peak);
    for (int64_t j = count; j < lp; ++j) row[j] = 0;
    const acc_t total = lane_sum<acc_t>(row, nullptr, lp);
    const acc_t inverse = acc_t(1) / total + nan;  // fast_exp does not carry NaN: the weight does
    for (int64_t j = 0; j < lp; ++j) row[j] *= inverse;
    lse[r] = peak + std::log(total) + nan;
  }
}

// Strided view of a (B, N, H, D) tensor whose last dim is contiguous.
template <typename T>
struct Tokens {
  T* data;
  int64_t sb, sn, sh;
  T* at(int64_t b, int64_t n, int64_t h) const { return data + b * sb + n * sn + h * sh; }
};

template <typename T>
Tokens<T> tokens(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Visible key positions: query row i uses keep row i % rows (layout in csrc/ops.cpp).
struct Keep {
  const int32_t* index;
  const int32_t* count;
  int64_t rows, width;
  bool is_run;
  int64_t max_count;
  int64_t row_of(int64_t i) const { return i % rows; }
  int64_t position(int64_t r, int64_t j) const { return is_run ? index[r * width] + j : index[r * width + j]; }
};

template <typename scalar_t>
struct Problem {
  Tokens<const scalar_t> q, k, v, grad_out;  // grad_out: backward only
  Tokens<scalar_t> out, grad_q, grad_k, grad_v;
  float* lse;
  Keep keep;
  int64_t bq, bk, nq, nk, heads, d;
  double scale;
  int64_t views() const { return bq / bk; }
};

// Zero-initialised scratch whose start is 64-byte aligned (rows padded to kLanes stay aligned).
template <typename acc_t>
class Scratch {
 public:
  explicit Scratch(int64_t size) : storage_(size + kLanes<acc_t>, acc_t(0)) {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = storage_.data() + (64 - address % 64) % 64 / sizeof(acc_t);
  }
  acc_t* get() { return data_; }

 private:
  std::vector<acc_t> storage_;
  acc_t* data_;
};

// Visible rows (b, keep row r, h) of x as a (lp, dp) buffer (transposed: (dp, lp)), zero-padded.
template <typename scalar_t, typename acc_t>
void gather(const Tokens<const scalar_t>& x, const Keep& keep, int64_t b, int64_t r, int64_t h, int64_t count,
            int64_t d, int64_t lp, int64_t dp, bool transposed, acc_t* out) {
  std::fill(out, out + lp * dp, acc_t(0));
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t* row = x.at(b, keep.position(r, j), h);
    if (transposed) {
      for (int64_t e = 0; e < d; ++e) out[e * lp + j] = static_cast<acc_t>(row[e]);
    } else {
      for (int64_t e = 0; e < d; ++e) out[j * dp + e] = static_cast<acc_t>(row[e]);
    }
  }
}

// Query rows n0 .. n0 + rows of (i, :, h) as a (rows_padded, dp) buffer, padding rows zeroed.
template <typename scalar_t, typename acc_t>
void load_rows(const Tokens<const scalar_t>& x, int64_t i, int64_t n0, int64_t rows, int64_t rows_padded, int64_t h,
               int64_t d, int64_t dp, acc_t* out) {
  for (int64_t n = 0; n < rows; ++n) {
    const scalar_t* row = x.at(i, n0 + n, h);
    for (int64_t e = 0; e < d; ++e) out[n * dp + e] = static_cast<acc_t>(row[e]);
  }
  std::fill(out + rows * dp, out + rows_padded * dp, acc_t(0));
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* in, int64_t rows, int64_t d, int64_t dp, const Tokens<scalar_t>& x, int64_t i,
                int64_t n0, int64_t h) {
  for (int64_t n = 0; n < rows; ++n) {
    scalar_t* row = x.at(i, n0 + n, h);
    for (int64_t e = 0; e < d; ++e) row[e] = static_cast<scalar_t>(in[n * dp + e]);
  }
}

template <typename scalar_t>
void zero_rows(const Tokens<scalar_t>& x, int64_t b, int64_t n0, int64_t rows, int64_t h, int64_t d) {
  for (int64_t n = n0; n < n0 + rows; ++n) std::fill(x.at(b, n, h), x.at(b, n, h) + d, scalar_t(0));
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows (i, n, h) lie H * D elements apart, so each is a new stream to the hardware prefetcher:
// the rows of the next block are requested (into L2) while this block computes.
template <int kWrite, typename T>
void prefetch_rows(const Tokens<T>& x, int64_t i, int64_t n0, int64_t rows, int64_t h, int64_t d) {
  for (int64_t n = n0; n < n0 + rows; ++n) {
    const char* row = reinterpret_cast<const char*>(x.at(i, n, h));
    for (int64_t byte = 0; byte < d * static_cast<int64_t>(sizeof(T)); byte += 64)
      __builtin_prefetch(row + byte, kWrite, 2);
  }
}

// Forward of items [begin, end), item = (b * heads + h) * views + view.
template <class Isa, typename scalar_t>
void forward_items(const Problem<scalar_t>& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const int64_t views = p.views(), d = p.d, dp = padded<acc_t>(d), lmax = padded<acc_t>(p.keep.max_count);
  const int64_t block = std::min(kQueryBlock, round_up(p.nq, Isa::kTileRows));
  Scratch<acc_t> keys_t(dp * lmax), values(lmax * dp), queries(block * dp), scores(block * lmax), outs(block * dp);
  std::vector<acc_t> lse(block);
  int64_t cached_bh = -1, cached_r = -1, count = 0, lp = 0;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t bh = item / views, b = bh / p.heads, h = bh % p.heads, i = (item % views) * p.bk + b;
    const int64_t r = p.keep.row_of(i);
    const int64_t next_h = (item + 1) / views % p.heads, next_i = ((item + 1) % views) * p.bk + (item + 1) / views / p.heads;
    if (bh != cached_bh || r != cached_r) {
      cached_bh = bh, cached_r = r;
      count = p.keep.count[r], lp = padded<acc_t>(count);
      gather(p.k, p.keep, b, r, h, count, d, lp, dp, true, keys_t.get());
      gather(p.v, p.keep, b, r, h, count, d, lp, dp, false, values.get());
    }
    float* lse_row = p.lse + (i * p.heads + h) * p.nq;
    if (count == 0) {
      zero_rows(p.out, i, 0, p.nq, h, d);
      std::fill(lse_row, lse_row + p.nq, -std::numeric_limits<float>::infinity());
      continue;
    }
    for (int64_t n0 = 0; n0 < p.nq; n0 += block) {
      const int64_t rows = std::min(block, p.nq - n0), rows_padded = round_up(rows, Isa::kTileRows);
      load_rows(p.q, i, n0, rows, rows_padded, h, d, dp, queries.get());
      if (n0 + block < p.nq) {
        prefetch_rows<0>(p.q, i, n0 + block, std::min(block, p.nq - n0 - block), h, d);
        prefetch_rows<1>(p.out, i, n0 + block, std::min(block, p.nq - n0 - block), h, d);
      } else if (item + 1 < end) {
        prefetch_rows<0>(p.q, next_i, 0, std::min(block, p.nq), next_h, d);
        prefetch_rows<1>(p.out, next_i, 0, std::min(block, p.nq), next_h, d);
      }
      matmul<Isa>(queries.get(), dp, 1, keys_t.get(), lp, scores.get(), lp, rows_padded, d, lp, false);
      softmax_rows(scores.get(), rows_padded, count, lp, static_cast<acc_t>(p.scale), lse.data());
      matmul<Isa>(scores.get(), lp, 1, values.get(), dp, outs.get(), dp, rows_padded, count, dp, false);
      store_rows(outs.get(), rows, d, dp, p.out, i, n0, h);
      for (int64_t n = 0; n < rows; ++n) lse_row[n0 + n] = static_cast<float>(lse[n]);
    }
  }
}

// Backward of tasks [begin, end), task = b * heads + h. The softmax is recomputed from q and k
// rather than read from the float32 lse, which would cost float64 its precision.
template <class Isa, typename scalar_t>
void backward_tasks(const Problem<scalar_t>& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const int64_t views = p.views(), d = p.d, dp = padded<acc_t>(d), lmax = padded<acc_t>(p.keep.max_count);
  const int64_t block = std::min(kQueryBlock, round_up(p.nq, Isa::kTileRows));
  // All views of b read keep row b % R unless R = Bq: then the visible sets may differ and the
  // views' key gradients are summed in dense (Nk, dp) buffers.
  const bool shared = p.keep.rows != p.bq || views == 1;
  Scratch<acc_t> keys(lmax * dp), keys_t(dp * lmax), values_t(dp * lmax), queries(block * dp),
      grads_out(block * dp), probs(block * lmax), dscores(block * lmax), dq(block * dp), dk(lmax * dp),
      dv(lmax * dp), dense_dk(shared ? 0 : p.nk * dp), dense_dv(shared ? 0 : p.nk * dp);
  std::vector<acc_t> lse(block);
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.heads, h = task % p.heads;
    if (!shared) {
      std::fill(dense_dk.get(), dense_dk.get() + p.nk * dp, acc_t(0));
      std::fill(dense_dv.get(), dense_dv.get() + p.nk * dp, acc_t(0));
    }
    int64_t cached_r = -1, count = 0, lp = 0;
    bool fresh = true;  // dk, dv hold nothing yet
    for (int64_t view = 0; view < views; ++view) {
      const int64_t i = view * p.bk + b, r = p.keep.row_of(i);
      if (r != cached_r) {
        cached_r = r, count = p.keep.count[r], lp = padded<acc_t>(count);
        gather(p.k, p.keep, b, r, h, count, d, lp, dp, false, keys.get());
        gather(p.k, p.keep, b, r, h, count, d, lp, dp, true, keys_t.get());
        gather(p.v, p.keep, b, r, h, count, d, lp, dp, true, values_t.get());
      }
      if (count == 0) {
        zero_rows(p.grad_q, i, 0, p.nq, h, d);
        continue;
      }
      for (int64_t n0 = 0; n0 < p.nq; n0 += block) {
        const int64_t rows = std::min(block, p.nq - n0), rows_padded = round_up(rows, Isa::kTileRows);
        load_rows(p.q, i, n0, rows, rows_padded, h, d, dp, queries.get());
        load_rows(p.grad_out, i, n0, rows, rows_padded, h, d, dp, grads_out.get());
        const bool block_follows = n0 + block < p.nq;
        if (block_follows || view + 1 < views) {
          const int64_t next_i = block_follows ? i : i + p.bk, next_n0 = block_follows ? n0 + block : 0;
          const int64_t next_rows = std::min(block, p.nq - next_n0);
          prefetch_rows<0>(p.q, next_i, next_n0, next_rows, h, d);
          prefetch_rows<0>(p.grad_out, next_i, next_n0, next_rows, h, d);
          prefetch_rows<1>(p.grad_q, next_i, next_n0, next_rows, h, d);
        }
        acc_t* pr = probs.get();
        acc_t* ds = dscores.get();
        matmul<Isa>(queries.get(), dp, 1, keys_t.get(), lp, pr, lp, rows_padded, d, lp, false);
        softmax_rows(pr, rows_padded, count, lp, scale, lse.data());
        // dS = P * (dO V^T - rowsum(P * dO V^T)) * scale; zero on padding, where P is.
        matmul<Isa>(grads_out.get(), dp, 1, values_t.get(), lp, ds, lp, rows_padded, d, lp, false);
        for (int64_t n = 0; n < rows_padded; ++n) {
          const acc_t delta = lane_sum<acc_t>(pr + n * lp, ds + n * lp, lp);
          for (int64_t j = 0; j < lp; ++j) ds[n * lp + j] = pr[n * lp + j] * (ds[n * lp + j] - delta) * scale;
        }
        matmul<Isa>(ds, lp, 1, keys.get(), dp, dq.get(), dp, rows_padded, count, dp, false);
        store_rows(dq.get(), rows, d, dp, p.grad_q, i, n0, h);
        // dK += dS^T Q, dV += P^T dO: A transposed by its strides; padded query rows add 0.
        matmul<Isa>(ds, 1, lp, queries.get(), dp, dk.get(), dp, lp, rows_padded, dp, !fresh);
        matmul<Isa>(pr, 1, lp, grads_out.get(), dp, dv.get(), dp, lp, rows_padded, dp, !fresh);
        fresh = false;
      }
      if (!shared) {  // fold this view into the dense sums
        for (int64_t j = 0; j < count; ++j) {
          acc_t* sum_k = dense_dk.get() + p.keep.position(r, j) * dp;
          acc_t* sum_v = dense_dv.get() + p.keep.position(r, j) * dp;
          for (int64_t e = 0; e < dp; ++e) {
            sum_k[e] += dk.get()[j * dp + e];
            sum_v[e] += dv.get()[j * dp + e];
          }
        }
        fresh = true;
      }
    }
    if (shared) {
      zero_rows(p.grad_k, b, 0, p.nk, h, d);
      zero_rows(p.grad_v, b, 0, p.nk, h, d);
      if (!fresh) {
        for (int64_t j = 0; j < count; ++j) {
          const int64_t n = p.keep.position(cached_r, j);
          store_rows(dk.get() + j * dp, 1, d, dp, p.grad_k, b, n, h);
          store_rows(dv.get() + j * dp, 1, d, dp, p.grad_v, b, n, h);
        }
      }
    } else {
      store_rows(dense_dk.get(), p.nk, d, dp, p.grad_k, b, 0, h);
      store_rows(dense_dv.get(), p.nk, d, dp, p.grad_v, b, 0, h);
    }
  }
}

// Run-time choice of the instruction set (loca_kernels::cpu_isa()): each entry point below is
// its loop nest compiled (flattened, so every helper is inlined into it) for one target.
// The build turns off fp contraction (-ffp-contract=off); in the AVX2 and AVX-512 variants
// a * b + c should be one FMA. (clang: the pragma in tile().)
#if defined(LOCA_KERNELS_X86_VARIANTS) && !defined(__clang__)
#define LOCA_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define LOCA_CONTRACT
#endif
LOCA_CPU_VARIANTS(forward, LOCA_CONTRACT, (const Problem<scalar_t>& p, int64_t begin, int64_t end),
                  forward_items<IsaTile<kIsa>>(p, begin, end))
LOCA_CPU_VARIANTS(backward, LOCA_CONTRACT, (const Problem<scalar_t>& p, int64_t begin, int64_t end),
                  backward_tasks<IsaTile<kIsa>>(p, begin, end))

// ---- torch glue ---------------------------------------------------------------------------

// Checks the inputs: checks.h, then what the CPU kernels take. Returns keep_index made contiguous.
at::Tensor check_inputs(const loca_kernels::ErrorPrefix& where, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& keep_index, const at::Tensor& keep_count,
                        bool keep_is_run) {
  at::Tensor index =
      loca_kernels::check_attention_inputs(where, c10::kCPU, q, k, v, keep_index, keep_count, keep_is_run);
  loca_kernels::check_cpu_float(where, "q", q);
  for (int64_t dim = 0; dim < 4; ++dim)
    TORCH_CHECK_VALUE(q.size(dim) > 0 && k.size(dim) > 0, where, ": every dimension must be >= 1, got q ",
                      q.sizes(), " and k ", k.sizes());
  return index;
}

// The keep of `index` (checked keep_index, contiguous) after checking every value: counts and
// positions in range, positions of a row distinct, so that a direct caller of the operator cannot
// make the kernel read out of bounds or count a token twice.
Keep checked_keep(const loca_kernels::ErrorPrefix& where, const at::Tensor& index, const at::Tensor& keep_count,
                  bool keep_is_run, int64_t nk) {
  const int64_t rows = index.size(0), width = index.size(1);
  Keep keep{index.data_ptr<int32_t>(), keep_count.data_ptr<int32_t>(), rows, width, keep_is_run, 0};
  std::vector<uint8_t> seen(nk);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t count = keep.count[r];
    TORCH_CHECK_VALUE(count >= 0 && count <= nk && (keep_is_run || count <= width), where, ": keep_count[", r,
                      "]=", count, " is out of range for Nk=", nk, " and keep_index of shape ", index.sizes());
    keep.max_count = std::max(keep.max_count, count);
    if (keep_is_run) {
      TORCH_CHECK_VALUE(count == 0 || (keep.index[r * width] >= 0 && keep.index[r * width] + count <= nk), where,
                        ": keep run of row ", r, " (start ", count ? keep.index[r * width] : 0, ", length ", count,
                        ") does not fit in Nk=", nk);
      continue;
    }
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t n = keep.index[r * width + j];
      TORCH_CHECK_VALUE(n >= 0 && n < nk, where, ": keep_index[", r, ", ", j, "]=", n, " is out of range [0, Nk=", nk,
                        ")");
      TORCH_CHECK_VALUE(!seen[n], where, ": keep_index[", r, ", ", j, "]=", n,
                        " repeats a position of its row; the visible positions of a row must be distinct");
      seen[n] = 1;
    }
  }
  return keep;
}

template <typename scalar_t>
Problem<scalar_t> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Keep& keep,
                          double scale) {
  Problem<scalar_t> p{};
  p.q = tokens<const scalar_t>(q), p.k = tokens<const scalar_t>(k), p.v = tokens<const scalar_t>(v);
  p.keep = keep;
  p.bq = q.size(0), p.bk = k.size(0), p.nq = q.size(1), p.nk = k.size(1), p.heads = q.size(2), p.d = q.size(3);
  p.scale = scale;
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& keep_index,
                                                         const at::Tensor& keep_count, bool keep_is_run,
                                                         double scale) {
  const loca_kernels::ErrorPrefix where{"attention_forward", "cpu"};
  const at::Tensor index = check_inputs(where, q, k, v, keep_index, keep_count, keep_is_run);
  const Keep keep = checked_keep(where, index, keep_count, keep_is_run, k.size(1));
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_forward_cpu", [&] {
    auto p = problem<scalar_t>(q, k, v, keep, scale);
    p.out = tokens<scalar_t>(out);
    p.lse = lse.data_ptr<float>();
    const auto run = LOCA_CPU_VARIANT(forward, <scalar_t>);
    at::parallel_for(0, p.bk * p.heads * p.views(), 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& keep_index, const at::Tensor& keep_count,
    bool keep_is_run, double scale) {
  const loca_kernels::ErrorPrefix where{"attention_backward", "cpu"};
  const at::Tensor index = check_inputs(where, q, k, v, keep_index, keep_count, keep_is_run);
  const Keep keep = checked_keep(where, index, keep_count, keep_is_run, k.size(1));
  loca_kernels::check_attention_backward_inputs(where, q, grad_out, out, lse);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_backward_cpu", [&] {
    auto p = problem<scalar_t>(q, k, v, keep, scale);
    p.grad_out = tokens<const scalar_t>(grad_out);
    p.grad_q = tokens<scalar_t>(grad_q), p.grad_k = tokens<scalar_t>(grad_k), p.grad_v = tokens<scalar_t>(grad_v);
    const auto run = LOCA_CPU_VARIANT(backward, <scalar_t>);
    at::parallel_for(0, p.bk * p.heads, 1, [&](int64_t begin, int64_t end) { run(p, begin, end); });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(loca_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}
