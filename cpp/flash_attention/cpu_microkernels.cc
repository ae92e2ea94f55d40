// Float32 tile primitives (see cpu_microkernels.h). Written as fixed-size loops over small
// register blocks that the compiler vectorizes; on x86-64 Linux each function is cloned for
// AVX2+FMA (x86-64-v3) next to the baseline build and the loader picks the clone the CPU
// supports, so one wheel runs everywhere and still uses the wide units where they exist.
#include "flash_attention/cpu_microkernels.h"

#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define JSK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define JSK_MULTIVERSION
#endif

// Floating-point exception flags are never read here; without this GCC may not turn the
// compares of ExpApprox into vector selects.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace jax_sparsek::flash {

JSK_MULTIVERSION
void GemmTile(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t R = kGemmRows, W = kGemmCols;
  for (int64_t m = 0; m < M; m += R) {
    for (int64_t n = 0; n < N; n += W) {
      // A 4 x 16 block of C stays in registers over the whole K loop: each step loads one
      // 16-wide row of B and broadcasts four elements of A.
      float acc[R][W];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < W; ++c) acc[r][c] = accumulate ? C[(m + r) * ldc + n + c] : 0.0f;
      const float* a0 = A + (m + 0) * lda;
      const float* a1 = A + (m + 1) * lda;
      const float* a2 = A + (m + 2) * lda;
      const float* a3 = A + (m + 3) * lda;
      for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb + n;
        const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        for (int64_t c = 0; c < W; ++c) {
          acc[0][c] += x0 * b[c];
          acc[1][c] += x1 * b[c];
          acc[2][c] += x2 * b[c];
          acc[3][c] += x3 * b[c];
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < W; ++c) C[(m + r) * ldc + n + c] = acc[r][c];
    }
  }
}

// exp(x) = 2^n * exp(f) with n = round(x / ln 2) and |f| <= ln(2) / 2 (Cody-Waite split of
// ln 2 keeps f exact), exp(f) by its Taylor polynomial of degree 7 (truncation error 5e-9).
// Branch-free so that the loop vectorizes; results below 2^-126 flush to zero.
static inline float BitsToFloat(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(float));
  return x;
}
static inline uint32_t FloatToBits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(float));
  return u;
}

static inline float ExpApprox(float x) {
  x = x < -88.0f ? -88.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer...
  const float rounded = x * 1.44269504088896341f + magic;
  const float n = rounded - magic;
  const int32_t n_int = int32_t(FloatToBits(rounded) - FloatToBits(magic));  // ...held in its low bits
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const float two_n = BitsToFloat((uint32_t(n_int) + 127u) << 23);
  return n_int < -126 ? 0.0f : p * two_n;
}

JSK_MULTIVERSION
void ExpShiftedInPlace(float* x, int64_t n, float shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = ExpApprox(x[i] - shift);
}

JSK_MULTIVERSION
void SoftmaxGradRow(const float* p, const float* dp, float delta, float* ds, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (dp[i] - delta);
}

JSK_MULTIVERSION
void ScaleRow(float* y, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

JSK_MULTIVERSION
void AddRow(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace jax_sparsek::flash
