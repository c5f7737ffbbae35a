// CUDA kernels of masked_cross_attention (SPEC.md section 1) on the compact keep form
// (csrc/ops.cpp). Includes only the CUDA runtime and the project's header, so nvcc compiles
// it on machines without a GPU; torch glue lives in bind_cuda.cpp.
//
// float16 / bfloat16: tensor-core kernels (mma.sync m16n8k16, float32 accumulation), one
// warp per 16 rows of a tile, tiles staged in shared memory:
//   forward_mma   block = (query row i, head, 64 queries); loops over blocks of 64 visible
//                 keys with an online softmax (one block when at most 64 keys are visible).
//   grad_q_mma    same tiling; recomputes P from lse, writes grad_q and delta = rowsum(dO * O).
//   grad_kv_mma   block = (reference b, head, 64 keys); loops over the views b, b + Bk, ...
//                 and their queries, accumulating dK and dV in registers: deterministic.
//                 When the views share one keep row with at most 64 visible keys (LOCA), the
//                 block sees every key of those query rows and also writes grad_q (and
//                 computes delta itself): Q and dO are read once; grad_q_mma skips such rows.
// float32: SIMT kernels with the same loop structure, one warp per query row or per key,
// exact float32 arithmetic (no TF32).
//
// Keys of a (reference, key block) in grad_kv: when every view of a reference uses the same
// keep row (R = 1 or Bk, or V = 1) the block covers 64 positions of that row's visible list;
// when each query row has its own keep row (R = Bq, V > 1) it covers 64 consecutive tokens and
// each view marks which of them it sees.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "loca_kernels/attention_cuda.h"

namespace loca_kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 16;            // the M side of one mma tile
constexpr int kTileRows = kWarps * kRowsPerWarp;
constexpr int kPad = 8;                      // shared rows padded by 16 bytes: no bank conflicts
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Shared helpers

// The visible keys of one keep row.
struct KeepRow {
  const int32_t* index;
  int count;
  int start;  // first token when the row is a run
  bool is_run;
};

__device__ inline KeepRow keep_row(const AttentionKeep& keep, int query_batch_row, int nk) {
  const int r = query_batch_row % keep.rows;
  KeepRow row;
  row.index = keep.index + static_cast<int64_t>(r) * keep.row_stride;
  row.is_run = keep.is_run;
  row.start = keep.is_run ? row.index[0] : 0;
  const int limit = keep.is_run ? nk : static_cast<int>(keep.length);
  row.count = min(max(keep.count[r], 0), limit);
  return row;
}

// Token of visible position p, or -1 when it lies outside [0, nk). Inputs are validated in
// Python; the check only keeps memory accesses in bounds on bad input.
__device__ inline int token_of(const KeepRow& row, int p, int nk) {
  const int t = row.is_run ? row.start + p : row.index[p];
  return (t >= 0 && t < nk) ? t : -1;
}

template <typename E>
__device__ inline E* row_ptr(const AttentionTensor& t, int b, int n, int h) {
  return static_cast<E*>(t.data) + b * t.stride_b + n * t.stride_n + h * t.stride_h;
}

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Reduce over the 4 lanes that hold one row of an mma accumulator.
__device__ inline float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ inline float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// d += a * b for one mma.m16n8k16 with float accumulators and 16-bit operands of PTX type `ab`
// ("f16" or "bf16"): the one place the instruction is written, for both element types below.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LOCA_MMA_M16N8K16(ab, d, a, b0, b1)                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ab "." ab ".f32 {%0,%1,%2,%3}, "        \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#else
// bind_cuda.cpp refuses devices below compute capability 8.0
#define LOCA_MMA_M16N8K16(ab, d, a, b0, b1) __trap()
#endif

// 16-bit element types, handled as raw bits in memory.
struct Half {
  static __device__ float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
  static __device__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    LOCA_MMA_M16N8K16("f16", d, a, b0, b1);
  }
};

struct BFloat16 {
  static __device__ float to_float(uint16_t x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  static __device__ uint16_t from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  static __device__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    LOCA_MMA_M16N8K16("bf16", d, a, b0, b1);
  }
};

template <class Ty>
__device__ inline uint32_t pack(float lo, float hi) {
  return static_cast<uint32_t>(Ty::from_float(lo)) | (static_cast<uint32_t>(Ty::from_float(hi)) << 16);
}

// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for lane with
// group g = lane / 4 and column pair c = 2 * (lane % 4):
//   A (16 x 16, row major): regs {(g, c), (g + 8, c), (g, c + 8), (g + 8, c + 8)}, each holding
//     columns c and c + 1 (lower column in the low half);
//   B (16 x 8): regs {(k = c, n = g), (k = c + 8, n = g)}, each holding k and k + 1;
//   C (16 x 8, float): {(g, c), (g, c + 1), (g + 8, c), (g + 8, c + 1)}.
struct Lane {
  int g, c;
  __device__ Lane() : g((threadIdx.x & 31) >> 2), c(2 * (threadIdx.x & 3)) {}
};

__device__ inline uint32_t load_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two elements one row apart (a B fragment register read from a [k][n] tile).
__device__ inline uint32_t load_column_pair(const uint16_t* p, int stride) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[stride]) << 16);
}

// A fragment of rows row0..row0+15, columns k0..k0+15 of a row-major tile.
__device__ inline void load_a(uint32_t (&a)[4], const uint16_t* tile, int stride, int row0, int k0,
                              const Lane& lane) {
  const uint16_t* p = tile + (row0 + lane.g) * stride + k0 + lane.c;
  a[0] = load_u32(p);
  a[1] = load_u32(p + 8 * stride);
  a[2] = load_u32(p + 8);
  a[3] = load_u32(p + 8 * stride + 8);
}

// B fragment (k0..k0+15) x (n0..n0+7) from a tile stored [n][k] (k contiguous).
__device__ inline void load_b_nk(uint32_t& b0, uint32_t& b1, const uint16_t* tile, int stride, int n0,
                                 int k0, const Lane& lane) {
  const uint16_t* p = tile + (n0 + lane.g) * stride + k0 + lane.c;
  b0 = load_u32(p);
  b1 = load_u32(p + 8);
}

// B fragment (k0..k0+15) x (n0..n0+7) from a tile stored [k][n] (n contiguous).
__device__ inline void load_b_kn(uint32_t& b0, uint32_t& b1, const uint16_t* tile, int stride, int k0,
                                 int n0, const Lane& lane) {
  const uint16_t* p = tile + (k0 + lane.c) * stride + n0 + lane.g;
  b0 = load_column_pair(p, stride);
  b1 = load_column_pair(p + 8 * stride, stride);
}

// The accumulators of n-tiles 2 kt and 2 kt + 1 (16 rows x 16 columns) as an A fragment.
template <class Ty, int NT>
__device__ inline void accumulator_as_a(uint32_t (&a)[4], const float (&acc)[NT][4], int kt) {
  a[0] = pack<Ty>(acc[2 * kt][0], acc[2 * kt][1]);
  a[1] = pack<Ty>(acc[2 * kt][2], acc[2 * kt][3]);
  a[2] = pack<Ty>(acc[2 * kt + 1][0], acc[2 * kt + 1][1]);
  a[3] = pack<Ty>(acc[2 * kt + 1][2], acc[2 * kt + 1][3]);
}

// acc (rows x NT * 8) += A (rows x D, fragments) times the transpose of a shared tile of NT * 8
// rows of D elements: S = Q K^T, dP = dO V^T.
template <class Ty, int D, int NT>
__device__ inline void accumulate_fragments_times_tile_t(float (&acc)[NT][4], const uint32_t (&frag)[D / 16][4],
                                                         const uint16_t* tile, int stride, const Lane& lane) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b0, b1;
      load_b_nk(b0, b1, tile, stride, j * 8, kk * 16, lane);
      Ty::mma(acc[j], frag[kk], b0, b1);
    }
  }
}

// acc (rows x D) += P (rows x NT * 8, accumulators of the score tiles) times a shared tile of
// NT * 8 rows of D elements: P V in the forward pass, dS K for dQ, P dO and dS Q for dV and dK.
template <class Ty, int D, int NT>
__device__ inline void accumulate_scores_times_tile(float (&acc)[D / 8][4], const float (&scores)[NT][4],
                                                    const uint16_t* tile, int stride, const Lane& lane) {
#pragma unroll
  for (int kt = 0; kt < NT / 2; ++kt) {
    uint32_t a[4];
    accumulator_as_a<Ty>(a, scores, kt);
#pragma unroll
    for (int jd = 0; jd < D / 8; ++jd) {
      uint32_t b0, b1;
      load_b_kn(b0, b1, tile, stride, kt * 16, jd * 8, lane);
      Ty::mma(acc[jd], a, b0, b1);
    }
  }
}

// Copy `rows` rows of D elements into a shared tile (row stride D + kPad); source_of(r) gives
// the global row or nullptr for a zero row. `vec`: every row is 16-byte aligned.
template <int D, class SourceOf>
__device__ inline void load_tile(uint16_t* tile, int rows, SourceOf source_of, bool vec) {
  constexpr int kStride = D + kPad;
  if (vec) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < rows * kChunks; idx += blockDim.x) {
      const int r = idx / kChunks, part = idx % kChunks;
      const uint16_t* src = source_of(r);
      uint4 value = make_uint4(0, 0, 0, 0);
      if (src != nullptr) value = reinterpret_cast<const uint4*>(src)[part];
      *reinterpret_cast<uint4*>(tile + r * kStride + part * 8) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      const uint16_t* src = source_of(r);
      tile[r * kStride + d] = src != nullptr ? src[d] : uint16_t(0);
    }
  }
}

// Copy a shared tile out to the global rows dest_of(r) (nullptr: skip the row).
template <int D, class DestOf>
__device__ inline void store_tile(const uint16_t* tile, int rows, DestOf dest_of, bool vec) {
  constexpr int kStride = D + kPad;
  if (vec) {
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < rows * kChunks; idx += blockDim.x) {
      const int r = idx / kChunks, part = idx % kChunks;
      uint16_t* dst = dest_of(r);
      if (dst != nullptr)
        reinterpret_cast<uint4*>(dst)[part] = *reinterpret_cast<const uint4*>(tile + r * kStride + part * 8);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      uint16_t* dst = dest_of(r);
      if (dst != nullptr) dst[d] = tile[r * kStride + d];
    }
  }
}

// delta = rowsum(dO * O) of query row (i, n, h), with dO a row of a shared tile, computed by one
// warp (the sum in every lane); 0 past nq.
template <class Ty, int D>
__device__ inline float warp_row_delta(const uint16_t* grad_out_row, const AttentionTensor& out, int i, int n, int h,
                                       int nq) {
  float acc = 0.f;
  if (n < nq) {
    const uint16_t* out_row = row_ptr<const uint16_t>(out, i, n, h);
    for (int d = threadIdx.x & 31; d < D; d += 32) acc += Ty::to_float(grad_out_row[d]) * Ty::to_float(out_row[d]);
  }
  return warp_sum(acc);
}

// Query rows n0 .. n0 + rows of (query batch row i, head h) of t into a shared tile; rows past nq
// are zero.
template <int D>
__device__ inline void load_query_tile(uint16_t* tile, int rows, const AttentionTensor& t, int i, int n0, int h,
                                       int nq, bool vec) {
  load_tile<D>(tile, rows, [&](int r) -> const uint16_t* {
    return n0 + r < nq ? row_ptr<const uint16_t>(t, i, n0 + r, h) : nullptr;
  }, vec);
}

// The reverse: a shared tile out to query rows n0 .. n0 + rows of (i, h) of t, those before nq.
template <int D>
__device__ inline void store_query_tile(const uint16_t* tile, int rows, const AttentionTensor& t, int i, int n0,
                                        int h, int nq, bool vec) {
  store_tile<D>(tile, rows, [&](int r) -> uint16_t* {
    return n0 + r < nq ? row_ptr<uint16_t>(t, i, n0 + r, h) : nullptr;
  }, vec);
}

// Stage the keys and values of the tokens tokens[0..rows) (-1: a zero row, so that P = 0 there
// never meets garbage, which could be NaN) of (reference b, head h) in shared tiles.
template <int D>
__device__ inline void load_key_tiles(uint16_t* k_tile, uint16_t* v_tile, const int* tokens, int rows,
                                      const AttentionTensor& k, const AttentionTensor& v, int b, int h, bool vec) {
  load_tile<D>(k_tile, rows, [&](int r) -> const uint16_t* {
    return tokens[r] >= 0 ? row_ptr<const uint16_t>(k, b, tokens[r], h) : nullptr;
  }, vec);
  load_tile<D>(v_tile, rows, [&](int r) -> const uint16_t* {
    return tokens[r] >= 0 ? row_ptr<const uint16_t>(v, b, tokens[r], h) : nullptr;
  }, vec);
}

// The next block of a query row's visible keys: positions p0 .. p0 + kKeys of `row` into
// tokens[] and their keys and values into the shared tiles, between barriers (the previous block
// is no longer read when it starts; the tiles are complete when it returns).
template <int D, int kKeys>
__device__ inline void load_key_block(uint16_t* k_tile, uint16_t* v_tile, int* tokens, const KeepRow& row, int p0,
                                      const AttentionTensor& k, const AttentionTensor& v, int b, int h, int nk,
                                      bool vec) {
  __syncthreads();
  if (threadIdx.x < kKeys) {
    const int pos = p0 + threadIdx.x;
    tokens[threadIdx.x] = pos < row.count ? token_of(row, pos, nk) : -1;
  }
  __syncthreads();
  load_key_tiles<D>(k_tile, v_tile, tokens, kKeys, k, v, b, h, vec);
  __syncthreads();
}

// Write a warp's accumulators (rows row0..row0+15, NT * 8 columns) into a shared tile; row
// g (+ 8) is multiplied by row_scale[0] ([1]).
template <class Ty, int NT>
__device__ inline void accumulator_to_tile(uint16_t* tile, int stride, int row0, const float (&acc)[NT][4],
                                           const float (&row_scale)[2], const Lane& lane) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint16_t* p = tile + (row0 + lane.g + 8 * half) * stride + j * 8 + lane.c;
      p[0] = Ty::from_float(acc[j][2 * half] * row_scale[half]);
      p[1] = Ty::from_float(acc[j][2 * half + 1] * row_scale[half]);
    }
  }
}

template <int NT>
__device__ inline void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
}

// Query tile (i, n0..n0+kTileRows) and its position in the grid: tile fastest, then view,
// head and reference, so the views sharing K and V run close together (L2 reuse).
struct QueryTile {
  int i, b, h, n0;
  __device__ QueryTile(const AttentionShape& s) {
    const int tiles = (s.nq + kTileRows - 1) / kTileRows;
    const int views = s.bq / s.bk;
    int64_t rest = blockIdx.x;
    n0 = static_cast<int>(rest % tiles) * kTileRows;
    rest /= tiles;
    const int view = static_cast<int>(rest % views);
    rest /= views;
    h = static_cast<int>(rest % s.heads);
    b = static_cast<int>(rest / s.heads);
    i = b + view * s.bk;
  }
};

// ---------------------------------------------------------------------------------------
// float16 / bfloat16 tensor-core kernels

template <class Ty, int D>
__global__ void __launch_bounds__(kThreads) forward_mma_kernel(const AttentionForwardParams p, bool vec) {
  constexpr int kKeys = 64;
  constexpr int kStride = D + kPad;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  uint16_t* q_tile = reinterpret_cast<uint16_t*>(shared_bytes);  // kTileRows x kStride
  uint16_t* k_tile = q_tile + kTileRows * kStride;              // kKeys x kStride
  uint16_t* v_tile = k_tile + kKeys * kStride;                  // kKeys x kStride
  int* tokens = reinterpret_cast<int*>(v_tile + kKeys * kStride);  // kKeys

  const AttentionShape& s = p.shape;
  const QueryTile qt(s);
  const KeepRow row = keep_row(p.keep, qt.i, s.nk);
  const Lane lane;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kRowsPerWarp;
  const bool warp_active = qt.n0 + row0 < s.nq;  // warps holding only padding rows skip the math
  const float scale2 = p.scale * kLog2e;           // scores in the log2 domain

  load_query_tile<D>(q_tile, kTileRows, p.q, qt.i, qt.n0, qt.h, s.nq, vec);
  __syncthreads();
  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(q_frag[kk], q_tile, kStride, row0, kk * 16, lane);

  float o[D / 8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's part of the running sum
  float nan[2] = {0.f, 0.f};            // this lane's sum of score * 0: NaN once a score is not finite

  for (int p0 = 0; p0 < row.count; p0 += kKeys) {
    load_key_block<D, kKeys>(k_tile, v_tile, tokens, row, p0, p.k, p.v, qt.b, qt.h, s.nk, vec);
    if (!warp_active) continue;

    float sc[kKeys / 8][4];
    zero(sc);
    accumulate_fragments_times_tile_t<Ty, D>(sc, q_frag, k_tile, kStride, lane);
    // Key p0 is visible to every row of the tile (one keep row per query batch row), so the
    // new maximum is finite.
    float m_new[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pos = p0 + j * 8 + lane.c + (e & 1);
        sc[j][e] = pos < row.count ? sc[j][e] * scale2 : -INFINITY;
        nan[e >> 1] += pos < row.count ? sc[j][e] * 0.f : 0.f;
        m_new[e >> 1] = fmaxf(m_new[e >> 1], sc[j][e]);
      }
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      m_new[half] = quad_max(m_new[half]);
      alpha[half] = exp2f(m[half] - m_new[half]);  // 0 on the first block (m = -inf)
      m[half] = m_new[half];
      l[half] *= alpha[half];
    }
#pragma unroll
    for (int jd = 0; jd < D / 8; ++jd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[jd][e] *= alpha[e >> 1];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = exp2f(sc[j][e] - m[e >> 1]);
        l[e >> 1] += sc[j][e];
      }
    accumulate_scores_times_tile<Ty, D>(o, sc, v_tile, kStride, lane);
  }

  float inv_l[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] = quad_sum(l[half]);
    // A row with a NaN or infinite score is all NaN (SPEC.md section 1), -inf scores included.
    nan[half] = quad_sum(nan[half]);
    inv_l[half] = (l[half] > 0.f ? 1.f / l[half] : 0.f) + nan[half];  // no visible key: out = 0
    const int n = qt.n0 + row0 + lane.g + 8 * half;
    if ((threadIdx.x & 3) == 0 && n < s.nq) {
      p.lse[(static_cast<int64_t>(qt.i) * s.heads + qt.h) * s.nq + n] =
          (l[half] > 0.f ? kLn2 * (m[half] + log2f(l[half])) : -INFINITY) + nan[half];
    }
  }
  __syncthreads();  // every warp is done with the shared tiles
  accumulator_to_tile<Ty>(q_tile, kStride, row0, o, inv_l, lane);
  __syncthreads();
  store_query_tile<D>(q_tile, kTileRows, p.out, qt.i, qt.n0, qt.h, s.nq, vec);
}

// Whether every view of a reference uses the same keep row (R = 1 or Bk, or one view).
__host__ __device__ inline bool keep_shared_by_views(const AttentionShape& s, const AttentionKeep& keep) {
  return keep.rows != s.bq || s.bq == s.bk;
}

constexpr int kGradKvKeys = kTileRows;  // one warp per 16 keys

// When the views of a reference share its keep row and its visible keys fit one key block
// (LOCA: 39 of 196), grad_kv_mma holds every key their query rows see and also computes delta
// and grad_q; grad_q_mma then skips those rows. Both kernels decide with this test (rows with
// no visible key stay with grad_q_mma, which writes their zeros).
__device__ inline bool grad_q_fused(const AttentionShape& s, const AttentionKeep& keep, const KeepRow& row) {
  return keep_shared_by_views(s, keep) && row.count > 0 && row.count <= kGradKvKeys;
}

// Key block of the grad_q kernel: smaller for D = 128 to stay within the register file.
template <int D>
constexpr int kGradQKeys = D <= 64 ? 64 : 32;

template <class Ty, int D>
__global__ void __launch_bounds__(kThreads) grad_q_mma_kernel(const AttentionBackwardParams p, bool vec) {
  constexpr int kKeys = kGradQKeys<D>;
  constexpr int kStride = D + kPad;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  uint16_t* q_tile = reinterpret_cast<uint16_t*>(shared_bytes);  // kTileRows x kStride
  uint16_t* do_tile = q_tile + kTileRows * kStride;             // kTileRows x kStride
  uint16_t* k_tile = do_tile + kTileRows * kStride;             // kKeys x kStride
  uint16_t* v_tile = k_tile + kKeys * kStride;                  // kKeys x kStride
  float* delta_rows = reinterpret_cast<float*>(v_tile + kKeys * kStride);  // kTileRows
  int* tokens = reinterpret_cast<int*>(delta_rows + kTileRows);           // kKeys

  const AttentionShape& s = p.shape;
  const QueryTile qt(s);
  const KeepRow row = keep_row(p.keep, qt.i, s.nk);
  if (grad_q_fused(s, p.keep, row)) return;  // grad_kv_mma_kernel writes these rows
  const Lane lane;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kRowsPerWarp;
  const bool warp_active = qt.n0 + row0 < s.nq;
  const float scale2 = p.scale * kLog2e;
  const int64_t stat_base = (static_cast<int64_t>(qt.i) * s.heads + qt.h) * s.nq;

  load_query_tile<D>(q_tile, kTileRows, p.q, qt.i, qt.n0, qt.h, s.nq, vec);
  load_query_tile<D>(do_tile, kTileRows, p.grad_out, qt.i, qt.n0, qt.h, s.nq, vec);
  __syncthreads();

  // delta = rowsum(dO * O), one warp per row; saved for grad_kv_mma_kernel.
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int n = qt.n0 + row0 + rr;
    const float acc = warp_row_delta<Ty, D>(do_tile + (row0 + rr) * kStride, p.out, qt.i, n, qt.h, s.nq);
    if ((threadIdx.x & 31) == 0) {
      delta_rows[row0 + rr] = acc;
      if (n < s.nq) p.delta[stat_base + n] = acc;
    }
  }
  __syncthreads();

  float delta[2], lse2[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + lane.g + 8 * half;
    delta[half] = delta_rows[r];
    lse2[half] = qt.n0 + r < s.nq ? p.lse[stat_base + qt.n0 + r] * kLog2e : 0.f;
  }
  uint32_t q_frag[D / 16][4], do_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    load_a(q_frag[kk], q_tile, kStride, row0, kk * 16, lane);
    load_a(do_frag[kk], do_tile, kStride, row0, kk * 16, lane);
  }
  float dq[D / 8][4];
  zero(dq);

  for (int p0 = 0; p0 < row.count; p0 += kKeys) {
    load_key_block<D, kKeys>(k_tile, v_tile, tokens, row, p0, p.k, p.v, qt.b, qt.h, s.nk, vec);
    if (!warp_active) continue;

    float sc[kKeys / 8][4], dp[kKeys / 8][4];
    zero(sc);
    zero(dp);
    accumulate_fragments_times_tile_t<Ty, D>(sc, q_frag, k_tile, kStride, lane);
    accumulate_fragments_times_tile_t<Ty, D>(dp, do_frag, v_tile, kStride, lane);
    // dS = P * (dP - delta), P recomputed from lse; kept in sc.
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pos = p0 + j * 8 + lane.c + (e & 1);
        const float prob = pos < row.count ? exp2f(sc[j][e] * scale2 - lse2[e >> 1]) : 0.f;
        sc[j][e] = prob * (dp[j][e] - delta[e >> 1]);
      }
    accumulate_scores_times_tile<Ty, D>(dq, sc, k_tile, kStride, lane);
  }

  __syncthreads();
  const float row_scale[2] = {p.scale, p.scale};
  accumulator_to_tile<Ty>(q_tile, kStride, row0, dq, row_scale, lane);
  __syncthreads();
  store_query_tile<D>(q_tile, kTileRows, p.grad_q, qt.i, qt.n0, qt.h, s.nq, vec);
}

// Key blocks per (reference, head) of the grad_kv kernels.
__host__ __device__ inline int grad_kv_blocks(const AttentionShape& s, const AttentionKeep& keep, int keys_per_block) {
  int64_t keys = s.nk;  // per-view keep rows: blocks of tokens
  if (keep_shared_by_views(s, keep)) keys = keep.is_run ? s.nk : keep.length;  // blocks of positions
  return static_cast<int>((keys + keys_per_block - 1) / keys_per_block);
}

// Query tile of the grad_kv kernel: smaller for D = 128 to stay within the register file.
template <int D>
constexpr int kGradKvQueries = D <= 64 ? 64 : 32;

template <class Ty, int D>
__global__ void __launch_bounds__(kThreads) grad_kv_mma_kernel(const AttentionBackwardParams p, bool vec) {
  constexpr int kKeys = kGradKvKeys;
  constexpr int kQueries = kGradKvQueries<D>;
  constexpr int kStride = D + kPad;
  constexpr int kDsStride = kKeys + kPad;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  uint16_t* k_tile = reinterpret_cast<uint16_t*>(shared_bytes);  // kKeys x kStride
  uint16_t* v_tile = k_tile + kKeys * kStride;                  // kKeys x kStride
  uint16_t* q_tile = v_tile + kKeys * kStride;                  // kQueries x kStride
  uint16_t* do_tile = q_tile + kQueries * kStride;              // kQueries x kStride
  uint16_t* ds_tile = do_tile + kQueries * kStride;             // kQueries x kDsStride: dS, fused grad_q
  float* lse2 = reinterpret_cast<float*>(ds_tile + kQueries * kDsStride);  // kQueries, log2 domain
  float* delta = lse2 + kQueries;                                         // kQueries
  int* tokens = reinterpret_cast<int*>(delta + kQueries);                 // kKeys
  int* visible = tokens + kKeys;                                          // kKeys, for the current view

  const AttentionShape& s = p.shape;
  const bool shared_keep = keep_shared_by_views(s, p.keep);
  const int blocks = grad_kv_blocks(s, p.keep, kKeys);
  const int key0 = static_cast<int>(blockIdx.x % blocks) * kKeys;
  const int h = static_cast<int>((blockIdx.x / blocks) % s.heads);
  const int b = static_cast<int>(blockIdx.x / blocks / s.heads);
  const int views = s.bq / s.bk;
  const Lane lane;
  const int warp = threadIdx.x / 32;
  const int row0 = warp * kRowsPerWarp;
  const float scale2 = p.scale * kLog2e;

  // Keys of this block: positions key0.. of the shared keep row, or tokens key0.. .
  const KeepRow shared_row = keep_row(p.keep, b, s.nk);
  const int block_keys = shared_keep ? shared_row.count : s.nk;
  if (key0 >= block_keys) return;  // uniform over the block
  const bool fused = grad_q_fused(s, p.keep, shared_row);  // then key0 == 0
  const bool warp_active = key0 + row0 < block_keys;
  if (threadIdx.x < kKeys) {
    const int pos = key0 + threadIdx.x;
    int token = -1;
    if (pos < block_keys) token = shared_keep ? token_of(shared_row, pos, s.nk) : pos;
    tokens[threadIdx.x] = token;
    visible[threadIdx.x] = shared_keep && pos < block_keys;
  }
  __syncthreads();
  load_key_tiles<D>(k_tile, v_tile, tokens, kKeys, p.k, p.v, b, h, vec);

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);

  for (int view = 0; view < views; ++view) {
    const int i = b + view * s.bk;
    if (!shared_keep) {
      // Mark the tokens of this block that view's keep row sees.
      const KeepRow row = keep_row(p.keep, i, s.nk);
      __syncthreads();  // the previous view no longer reads `visible`
      if (threadIdx.x < kKeys) {
        const int t = key0 + threadIdx.x;
        visible[threadIdx.x] = row.is_run && t >= row.start && t - row.start < row.count;
      }
      __syncthreads();
      if (!row.is_run) {
        for (int e = threadIdx.x; e < row.count; e += blockDim.x) {
          const int t = row.index[e] - key0;
          if (t >= 0 && t < kKeys) visible[t] = 1;  // positions are distinct
        }
      }
      __syncthreads();
      if (!__syncthreads_or(threadIdx.x < kKeys && visible[threadIdx.x])) continue;
    }
    const int64_t stat_base = (static_cast<int64_t>(i) * s.heads + h) * s.nq;

    for (int n0 = 0; n0 < s.nq; n0 += kQueries) {
      __syncthreads();  // the previous query tile is no longer read
      load_query_tile<D>(q_tile, kQueries, p.q, i, n0, h, s.nq, vec);
      load_query_tile<D>(do_tile, kQueries, p.grad_out, i, n0, h, s.nq, vec);
      if (threadIdx.x < kQueries) {
        const int n = n0 + threadIdx.x;
        lse2[threadIdx.x] = n < s.nq ? p.lse[stat_base + n] * kLog2e : 0.f;
        if (!fused) delta[threadIdx.x] = n < s.nq ? p.delta[stat_base + n] : 0.f;
      }
      __syncthreads();
      if (fused) {
        // delta = rowsum(dO * O), one warp per row.
        for (int r = warp; r < kQueries; r += kWarps) {
          const float acc = warp_row_delta<Ty, D>(do_tile + r * kStride, p.out, i, n0 + r, h, s.nq);
          if ((threadIdx.x & 31) == 0) delta[r] = acc;
        }
        __syncthreads();
      }

      // Transposed scores S^T (keys x queries) and dP^T = V dO^T; then P^T in st and
      // dS^T = P^T * (dP^T - delta) in dpt (zero for keys and queries out of range).
      float st[kQueries / 8][4], dpt[kQueries / 8][4];
      zero(st);
      zero(dpt);
      if (warp_active) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t k_frag[4], v_frag[4];
          load_a(k_frag, k_tile, kStride, row0, kk * 16, lane);
          load_a(v_frag, v_tile, kStride, row0, kk * 16, lane);
#pragma unroll
          for (int j = 0; j < kQueries / 8; ++j) {
            uint32_t b0, b1;
            load_b_nk(b0, b1, q_tile, kStride, j * 8, kk * 16, lane);
            Ty::mma(st[j], k_frag, b0, b1);
            load_b_nk(b0, b1, do_tile, kStride, j * 8, kk * 16, lane);
            Ty::mma(dpt[j], v_frag, b0, b1);
          }
        }
        const bool key_visible[2] = {visible[row0 + lane.g] != 0, visible[row0 + lane.g + 8] != 0};
#pragma unroll
        for (int j = 0; j < kQueries / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = j * 8 + lane.c + (e & 1);
            const bool valid = key_visible[e >> 1] && n0 + col < s.nq;
            const float prob = valid ? exp2f(st[j][e] * scale2 - lse2[col]) : 0.f;
            st[j][e] = prob;
            dpt[j][e] = prob * (dpt[j][e] - delta[col]);
          }
        // dV += P dO and dK += dS Q (each sum over the query tiles in the same order as before).
        accumulate_scores_times_tile<Ty, D, kQueries / 8>(dv, st, do_tile, kStride, lane);
        accumulate_scores_times_tile<Ty, D, kQueries / 8>(dk, dpt, q_tile, kStride, lane);
      }
      if (!fused) continue;

      // Fused grad_q: dQ = scale * dS K over all keys of the block. Every warp stores its dS^T
      // (zeros when inactive) as dS [query][key]; warp w then owns queries 16 w .. 16 w + 15.
#pragma unroll
      for (int j = 0; j < kQueries / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          ds_tile[(j * 8 + lane.c + (e & 1)) * kDsStride + row0 + lane.g + 8 * (e >> 1)] =
              Ty::from_float(dpt[j][e]);
      __syncthreads();
      if (row0 < kQueries) {
        float dq[D / 8][4];
        zero(dq);
#pragma unroll
        for (int kt = 0; kt < kKeys / 16; ++kt) {
          uint32_t a[4];
          load_a(a, ds_tile, kDsStride, row0, kt * 16, lane);
#pragma unroll
          for (int jd = 0; jd < D / 8; ++jd) {
            uint32_t b0, b1;
            load_b_kn(b0, b1, k_tile, kStride, kt * 16, jd * 8, lane);
            Ty::mma(dq[jd], a, b0, b1);
          }
        }
        const float row_scale[2] = {p.scale, p.scale};
        accumulator_to_tile<Ty>(q_tile, kStride, row0, dq, row_scale, lane);  // q_tile is no longer read
      }
      __syncthreads();
      store_query_tile<D>(q_tile, kQueries, p.grad_q, i, n0, h, s.nq, vec);
    }
  }

  __syncthreads();  // every warp is done reading k_tile and v_tile
  const float k_scale[2] = {p.scale, p.scale};
  const float v_scale[2] = {1.f, 1.f};
  accumulator_to_tile<Ty>(k_tile, kStride, row0, dk, k_scale, lane);
  accumulator_to_tile<Ty>(v_tile, kStride, row0, dv, v_scale, lane);
  __syncthreads();
  store_tile<D>(k_tile, kKeys, [&](int r) -> uint16_t* {
    return tokens[r] >= 0 ? row_ptr<uint16_t>(p.grad_k, b, tokens[r], h) : nullptr;
  }, vec);
  store_tile<D>(v_tile, kKeys, [&](int r) -> uint16_t* {
    return tokens[r] >= 0 ? row_ptr<uint16_t>(p.grad_v, b, tokens[r], h) : nullptr;
  }, vec);
}

// ---------------------------------------------------------------------------------------
// float32 SIMT kernels: one warp per query row (forward, grad_q) or per key (grad_kv); lane
// holds elements d = lane + 32 u of a row.

template <int D>
struct WarpRow {
  static constexpr int kPerLane = (D + 31) / 32;
  float x[kPerLane];

  __device__ void load(const float* row) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int d = lane + 32 * u;
      x[u] = (row != nullptr && d < D) ? row[d] : 0.f;
    }
  }
  __device__ void store(float* row, float factor) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int d = lane + 32 * u;
      if (d < D) row[d] = x[u] * factor;
    }
  }
  __device__ void fill(float value) {
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) x[u] = value;
  }
  __device__ float dot(const WarpRow& other) const {
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) acc = fmaf(x[u], other.x[u], acc);
    return warp_sum(acc);
  }
  // this = this * keep + weight * other
  __device__ void scale_add(float keep, float weight, const WarpRow& other) {
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) x[u] = fmaf(weight, other.x[u], x[u] * keep);
  }
};

// The query row (i, n, h) of a warp: n fastest, then head, then i.
struct QueryRow {
  int i, n, h;
  bool valid;
  __device__ QueryRow(const AttentionShape& s) {
    const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
    valid = w < static_cast<int64_t>(s.bq) * s.heads * s.nq;
    n = static_cast<int>(w % s.nq);
    h = static_cast<int>((w / s.nq) % s.heads);
    i = static_cast<int>(w / s.nq / s.heads);
  }
};

template <int D>
__global__ void __launch_bounds__(kThreads) forward_simt_kernel(const AttentionForwardParams p) {
  const AttentionShape& s = p.shape;
  const QueryRow qr(s);
  if (!qr.valid) return;  // whole warps only: no block-wide synchronisation below
  const int b = qr.i % s.bk;
  const KeepRow row = keep_row(p.keep, qr.i, s.nk);
  const float scale2 = p.scale * kLog2e;
  WarpRow<D> q, key, value, acc;
  q.load(row_ptr<const float>(p.q, qr.i, qr.n, qr.h));
  acc.fill(0.f);
  float m = -INFINITY, l = 0.f, nan = 0.f;  // nan: the sum of score * 0, NaN once one is not finite
  for (int pos = 0; pos < row.count; ++pos) {
    const int t = token_of(row, pos, s.nk);
    key.load(t >= 0 ? row_ptr<const float>(p.k, b, t, qr.h) : nullptr);
    value.load(t >= 0 ? row_ptr<const float>(p.v, b, t, qr.h) : nullptr);
    const float score = q.dot(key) * scale2;
    nan += score * 0.f;
    const float m_new = fmaxf(m, score);
    const float alpha = exp2f(m - m_new);  // 0 for the first key
    const float prob = exp2f(score - m_new);
    l = l * alpha + prob;
    acc.scale_add(alpha, prob, value);
    m = m_new;
  }
  // A row with a NaN or infinite score is all NaN (SPEC.md section 1), -inf scores included.
  acc.store(row_ptr<float>(p.out, qr.i, qr.n, qr.h), (l > 0.f ? 1.f / l : 0.f) + nan);
  if ((threadIdx.x & 31) == 0)
    p.lse[(static_cast<int64_t>(qr.i) * s.heads + qr.h) * s.nq + qr.n] =
        (l > 0.f ? kLn2 * (m + log2f(l)) : -INFINITY) + nan;
}

template <int D>
__global__ void __launch_bounds__(kThreads) grad_q_simt_kernel(const AttentionBackwardParams p) {
  const AttentionShape& s = p.shape;
  const QueryRow qr(s);
  if (!qr.valid) return;
  const int b = qr.i % s.bk;
  const KeepRow row = keep_row(p.keep, qr.i, s.nk);
  const float scale2 = p.scale * kLog2e;
  const int64_t stat = (static_cast<int64_t>(qr.i) * s.heads + qr.h) * s.nq + qr.n;
  WarpRow<D> q, grad_out, out, key, value, dq;
  q.load(row_ptr<const float>(p.q, qr.i, qr.n, qr.h));
  grad_out.load(row_ptr<const float>(p.grad_out, qr.i, qr.n, qr.h));
  out.load(row_ptr<const float>(p.out, qr.i, qr.n, qr.h));
  const float delta = grad_out.dot(out);
  if ((threadIdx.x & 31) == 0) p.delta[stat] = delta;
  const float lse2 = row.count > 0 ? p.lse[stat] * kLog2e : 0.f;
  dq.fill(0.f);
  for (int pos = 0; pos < row.count; ++pos) {
    const int t = token_of(row, pos, s.nk);
    key.load(t >= 0 ? row_ptr<const float>(p.k, b, t, qr.h) : nullptr);
    value.load(t >= 0 ? row_ptr<const float>(p.v, b, t, qr.h) : nullptr);
    const float prob = exp2f(q.dot(key) * scale2 - lse2);
    const float ds = prob * (grad_out.dot(value) - delta);
    dq.scale_add(1.f, ds, key);
  }
  dq.store(row_ptr<float>(p.grad_q, qr.i, qr.n, qr.h), p.scale);
}

template <int D>
__global__ void __launch_bounds__(kThreads) grad_kv_simt_kernel(const AttentionBackwardParams p) {
  const AttentionShape& s = p.shape;
  const bool shared_keep = keep_shared_by_views(s, p.keep);
  const int slots = grad_kv_blocks(s, p.keep, 1);  // one warp per key slot
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= static_cast<int64_t>(s.bk) * s.heads * slots) return;
  const int slot = static_cast<int>(w % slots);
  const int h = static_cast<int>((w / slots) % s.heads);
  const int b = static_cast<int>(w / slots / s.heads);
  const int lane = threadIdx.x & 31;
  const float scale2 = p.scale * kLog2e;

  // The key: position `slot` of the shared keep row, or token `slot`.
  const KeepRow shared_row = keep_row(p.keep, b, s.nk);
  if (shared_keep && slot >= shared_row.count) return;
  const int t = shared_keep ? token_of(shared_row, slot, s.nk) : slot;
  if (t < 0) return;
  WarpRow<D> key, value, q, grad_out, dk, dv;
  key.load(row_ptr<const float>(p.k, b, t, h));
  value.load(row_ptr<const float>(p.v, b, t, h));
  dk.fill(0.f);
  dv.fill(0.f);
  for (int view = 0; view < s.bq / s.bk; ++view) {
    const int i = b + view * s.bk;
    if (!shared_keep) {
      const KeepRow row = keep_row(p.keep, i, s.nk);
      bool seen = row.is_run && t >= row.start && t - row.start < row.count;
      if (!row.is_run) {
        for (int e = lane; e < row.count; e += 32) seen = seen || row.index[e] == t;
        seen = __any_sync(kFullMask, seen);
      }
      if (!seen) continue;
    }
    const int64_t stat_base = (static_cast<int64_t>(i) * s.heads + h) * s.nq;
    for (int n = 0; n < s.nq; ++n) {
      q.load(row_ptr<const float>(p.q, i, n, h));
      grad_out.load(row_ptr<const float>(p.grad_out, i, n, h));
      const float prob = exp2f(q.dot(key) * scale2 - p.lse[stat_base + n] * kLog2e);
      const float ds = prob * (grad_out.dot(value) - p.delta[stat_base + n]);
      dv.scale_add(1.f, prob, grad_out);
      dk.scale_add(1.f, ds, q);
    }
  }
  dk.store(row_ptr<float>(p.grad_k, b, t, h), p.scale);
  dv.store(row_ptr<float>(p.grad_v, b, t, h), 1.f);
}

// ---------------------------------------------------------------------------------------
// Launchers

bool aligned16(const AttentionTensor& t) {
  constexpr int64_t kElems = 8;  // 16 bytes of 16-bit elements
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride_b % kElems == 0 &&
         t.stride_n % kElems == 0 && t.stride_h % kElems == 0;
}

int64_t blocks_for_warps(int64_t warps) { return (warps + kWarps - 1) / kWarps; }

int64_t query_tiles(const AttentionShape& s) {
  return static_cast<int64_t>(s.bq) * s.heads * ((s.nq + kTileRows - 1) / kTileRows);
}

// Launch `kernel` on kThreads-thread blocks with `shared` bytes of dynamic shared memory,
// opting in above 48 KiB.
template <class... KernelArgs, class... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), int64_t blocks, size_t shared, cudaStream_t stream,
                   const Args&... args) {
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (shared > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) return error;
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(args...);
  return cudaGetLastError();
}

template <int D>
constexpr size_t tile_bytes(int rows) { return static_cast<size_t>(rows) * (D + kPad) * sizeof(uint16_t); }

template <class Ty, int D>
cudaError_t forward_mma(const AttentionForwardParams& p, cudaStream_t stream) {
  const bool vec = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out);
  const size_t shared = tile_bytes<D>(kTileRows) + 2 * tile_bytes<D>(64) + 64 * sizeof(int);
  return launch(forward_mma_kernel<Ty, D>, query_tiles(p.shape), shared, stream, p, vec);
}

template <class Ty, int D>
cudaError_t backward_mma(const AttentionBackwardParams& p, cudaStream_t stream) {
  const bool vec = aligned16(p.grad_out) && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) &&
                   aligned16(p.grad_q) && aligned16(p.grad_k) && aligned16(p.grad_v);
  constexpr int kQKeys = kGradQKeys<D>;
  const size_t q_shared = 2 * tile_bytes<D>(kTileRows) + 2 * tile_bytes<D>(kQKeys) +
                          kTileRows * sizeof(float) + kQKeys * sizeof(int);
  // grad_q first: the rows it handles get their delta, which grad_kv reads.
  cudaError_t error = launch(grad_q_mma_kernel<Ty, D>, query_tiles(p.shape), q_shared, stream, p, vec);
  if (error != cudaSuccess) return error;
  constexpr int kQueries = kGradKvQueries<D>;
  const size_t kv_shared = 2 * tile_bytes<D>(kGradKvKeys) + 2 * tile_bytes<D>(kQueries) +
                           tile_bytes<kGradKvKeys>(kQueries) + 2 * kQueries * sizeof(float) +
                           2 * kGradKvKeys * sizeof(int);
  const int64_t kv_blocks =
      static_cast<int64_t>(p.shape.bk) * p.shape.heads * grad_kv_blocks(p.shape, p.keep, kGradKvKeys);
  return launch(grad_kv_mma_kernel<Ty, D>, kv_blocks, kv_shared, stream, p, vec);
}

template <int D>
cudaError_t forward_simt(const AttentionForwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.shape.bq) * p.shape.heads * p.shape.nq;
  return launch(forward_simt_kernel<D>, blocks_for_warps(rows), 0, stream, p);
}

template <int D>
cudaError_t backward_simt(const AttentionBackwardParams& p, cudaStream_t stream) {
  const AttentionShape& s = p.shape;
  const int64_t rows = static_cast<int64_t>(s.bq) * s.heads * s.nq;
  // grad_q first: it writes delta, which grad_kv reads.
  const cudaError_t error = launch(grad_q_simt_kernel<D>, blocks_for_warps(rows), 0, stream, p);
  if (error != cudaSuccess) return error;
  const int64_t keys = static_cast<int64_t>(s.bk) * s.heads * grad_kv_blocks(s, p.keep, 1);
  return launch(grad_kv_simt_kernel<D>, blocks_for_warps(keys), 0, stream, p);
}

// Calls body(std::integral_constant<int, D>()) for the runtime head dim D, one instance per entry
// of kAttentionCudaHeadDims (loca_kernels/attention.h).
template <int I = 0, class Body>
cudaError_t with_head_dim(int head_dim, Body body) {
  if constexpr (I == kAttentionCudaHeadDimCount) {
    return cudaErrorInvalidValue;  // bind_cuda.cpp reports the supported dims first
  } else {
    constexpr int D = kAttentionCudaHeadDims[I];
    static_assert(D % 16 == 0, "the mma kernels take D in steps of 16 (one k-step of m16n8k16)");
    if (head_dim == D) return body(std::integral_constant<int, D>());
    return with_head_dim<I + 1>(head_dim, body);
  }
}

bool empty(const AttentionShape& s) {
  return s.bq == 0 || s.bk == 0 || s.nq == 0 || s.heads == 0;
}

}  // namespace

cudaError_t launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  if (empty(p.shape)) return cudaSuccess;
  return with_head_dim(p.shape.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    switch (p.dtype) {
      case Dtype::kFloat16: return forward_mma<Half, D>(p, stream);
      case Dtype::kBFloat16: return forward_mma<BFloat16, D>(p, stream);
      default: return forward_simt<D>(p, stream);
    }
  });
}

cudaError_t launch_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  if (empty(p.shape)) return cudaSuccess;
  return with_head_dim(p.shape.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    switch (p.dtype) {
      case Dtype::kFloat16: return backward_mma<Half, D>(p, stream);
      case Dtype::kBFloat16: return backward_mma<BFloat16, D>(p, stream);
      default: return backward_simt<D>(p, stream);
    }
  });
}

}  // namespace loca_kernels
