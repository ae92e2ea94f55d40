// Scalar math the CPU kernels share, written so that the loops calling it vectorize.
#pragma once

#include <cstdint>

#include "common/ffi_helpers.h"

// Kernels marked JSK_MULTIVERSION are cloned for AVX2+FMA (x86-64-v3) next to the baseline
// build on x86-64 Linux; the loader picks the clone the CPU supports, so one wheel runs
// everywhere and still uses the wide units where they exist.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define JSK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define JSK_MULTIVERSION
#endif

namespace jax_sparsek {

// exp(x), branch-free so that loops over it vectorize (libm's expf does not): x = n ln2 + r
// with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error below 2e-9 before
// rounding), 2^n through the exponent bits. Below -87 it flushes to 0; above 88 it saturates at
// e^88 (softmax arguments here are s - max <= 0, or s - lse, which a tiny gate can make positive).
inline float FastExp(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |value| < 2^22).
  const float n = (clamped * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 hi + lo
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = FloatFromBits(uint32_t(int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : poly * scale;
}

}  // namespace jax_sparsek
