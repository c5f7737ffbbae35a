// Scalar math for the C++ CPU kernels, written so that loops over it vectorise (plain C++,
// no torch): std::exp is a library call and std::max returns a reference (a branch), both of
// which stop the compiler from vectorising a loop.
#pragma once

#include <cstdint>
#include <cstring>

namespace loca_kernels {

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

}  // namespace loca_kernels
