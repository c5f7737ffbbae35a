// Shared by the C++ CPU kernels (plain C++, no torch): the instruction set their hot loops run
// with, and scalar math written so that loops over it vectorise (std::exp is a library call
// and std::max returns a reference, a branch: both stop the compiler from vectorising).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace loca_kernels {

// Each kernel compiles its hot loops once per instruction set (x86-64 only; elsewhere only
// kBaseline exists) and runs the variant of cpu_isa().
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "baseline";
}

// The widest set this CPU has (AVX-512 F/VL/BW/DQ, AVX2 with FMA, or the baseline), narrowed
// by the environment variable LOCA_KERNELS_CPU_ISA=baseline|avx2 (read once; tests use it to
// run every variant on one machine). Never wider than the CPU.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kBaseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      best = CpuIsa::kAvx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = CpuIsa::kAvx2;
    }
#endif
    const char* asked = std::getenv("LOCA_KERNELS_CPU_ISA");
    if (asked == nullptr) return best;
    const CpuIsa wanted = std::strcmp(asked, "baseline") == 0 ? CpuIsa::kBaseline
                          : std::strcmp(asked, "avx2") == 0   ? CpuIsa::kAvx2
                                                              : CpuIsa::kAvx512;
    return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
  }();
  return isa;
}

// A kernel compiles its hot loop nest once per instruction set with LOCA_CPU_VARIANTS(name,
// attributes, (params), body): template <typename scalar_t> functions name_baseline, and on
// x86-64 also name_avx2 and name_avx512, taking `params` and running `body`, each flattened (every
// helper inlined into it) and compiled for its set, in which the constant kIsa (a CpuIsa) names
// that set; `attributes` (may be empty) are added to the AVX2 and AVX-512 variants.
// LOCA_CPU_VARIANT(name, <template args>) is the variant for cpu_isa().
#define LOCA_CPU_VARIANT_FUNCTION(function, isa, attributes, params, ...)          \
  template <typename scalar_t>                                                    \
  attributes void function params {                                               \
    [[maybe_unused]] constexpr ::loca_kernels::CpuIsa kIsa = ::loca_kernels::isa; \
    __VA_ARGS__;                                                                  \
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOCA_KERNELS_X86_VARIANTS 1
#define LOCA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), flatten))
#define LOCA_TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))

template <typename Fn>
Fn cpu_variant(Fn baseline, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    case CpuIsa::kBaseline: break;
  }
  return baseline;
}
#define LOCA_CPU_VARIANTS(name, attributes, params, ...)                                                     \
  LOCA_CPU_VARIANT_FUNCTION(name##_baseline, CpuIsa::kBaseline, __attribute__((flatten)), params, __VA_ARGS__) \
  LOCA_CPU_VARIANT_FUNCTION(name##_avx2, CpuIsa::kAvx2, LOCA_TARGET_AVX2 attributes, params, __VA_ARGS__)      \
  LOCA_CPU_VARIANT_FUNCTION(name##_avx512, CpuIsa::kAvx512, LOCA_TARGET_AVX512 attributes, params, __VA_ARGS__)
#define LOCA_CPU_VARIANT(name, targs) \
  ::loca_kernels::cpu_variant(name##_baseline targs, name##_avx2 targs, name##_avx512 targs)
#else
#define LOCA_CPU_VARIANTS(name, attributes, params, ...) \
  LOCA_CPU_VARIANT_FUNCTION(name##_baseline, CpuIsa::kBaseline, __attribute__((flatten)), params, __VA_ARGS__)
#define LOCA_CPU_VARIANT(name, targs) name##_baseline targs
#endif

// max as a select on values.
inline float max_of(float a, float b) { return a > b ? a : b; }

// exp(x) for x <= 88: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial
// (relative error below 2e-7), times 2^n built in the exponent bits. exp(x) below 2^-125 (past
// float32's normal range; -inf included) gives 0.
inline float fast_exp(float x) {
  const float clamped = max_of(x, -87.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (clamped * 1.44269504f + kRound) - kRound;
  const float r = (clamped - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// x[j] = fast_exp(x[j] - shift) in place for j < n; returns their sum, taken in 16 independent
// lanes (a float sum is otherwise not vectorised) plus the tail: the tail's sum first, then the
// lanes in order, so the result depends on n only, not on the instruction set or the caller.
inline float exp_sum_in_place(float* x, float shift, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lane_sum[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      x[j + l] = fast_exp(x[j + l] - shift);
      lane_sum[l] += x[j + l];
    }
  }
  float total = 0.0f;
  for (; j < n; ++j) total += (x[j] = fast_exp(x[j] - shift));
  for (int64_t l = 0; l < kLanes; ++l) total += lane_sum[l];
  return total;
}

}  // namespace loca_kernels
