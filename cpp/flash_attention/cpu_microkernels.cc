// Float32 tile primitives (see cpu_microkernels.h): a register-blocked GEMM on vector types
// and plain loops the compiler vectorizes, each cloned per CPU level (JSK_MULTIVERSION).
#include "flash_attention/cpu_microkernels.h"

#include <cstring>

// Floating-point exception flags are never read here; without this GCC may not turn the
// compares of FastExp into vector selects (it must precede the header that defines FastExp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "common/cpu_math.h"

namespace jax_sparsek::flash {

// Eight floats as one value (GCC/Clang vector extension): one AVX register in the x86-64-v3
// clone, two SSE registers in the baseline one. Loads and stores go through memcpy because
// tile rows are only float-aligned; vectors pass by reference (by value, their ABI would
// differ between the clones).
typedef float Vec8 __attribute__((vector_size(32)));
static inline void Load8(Vec8& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }
static inline void Store8(float* p, const Vec8& v) { std::memcpy(p, &v, sizeof(v)); }

static_assert(kGemmRows == 4 && kGemmCols == 16, "GemmTile's register block is 4 x 16");

JSK_MULTIVERSION
void GemmTile(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* a0 = A + (m + 0) * lda;
    const float* a1 = A + (m + 1) * lda;
    const float* a2 = A + (m + 2) * lda;
    const float* a3 = A + (m + 3) * lda;
    float* c0 = C + (m + 0) * ldc;
    float* c1 = C + (m + 1) * ldc;
    float* c2 = C + (m + 2) * ldc;
    float* c3 = C + (m + 3) * ldc;
    for (int64_t n = 0; n < N; n += 16) {
      // A 4 x 16 block of C stays in eight registers over the whole K loop: each step loads
      // one 16-wide row of B and broadcasts four elements of A.
      Vec8 acc00 = {}, acc01 = {}, acc10 = {}, acc11 = {}, acc20 = {}, acc21 = {}, acc30 = {},
           acc31 = {};
      if (accumulate) {
        Load8(acc00, c0 + n), Load8(acc01, c0 + n + 8), Load8(acc10, c1 + n);
        Load8(acc11, c1 + n + 8), Load8(acc20, c2 + n), Load8(acc21, c2 + n + 8);
        Load8(acc30, c3 + n), Load8(acc31, c3 + n + 8);
      }
      const float* b = B + n;
      for (int64_t k = 0; k < K; ++k, b += ldb) {
        Vec8 b0, b1;
        Load8(b0, b), Load8(b1, b + 8);
        const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        acc00 += x0 * b0, acc01 += x0 * b1;
        acc10 += x1 * b0, acc11 += x1 * b1;
        acc20 += x2 * b0, acc21 += x2 * b1;
        acc30 += x3 * b0, acc31 += x3 * b1;
      }
      Store8(c0 + n, acc00), Store8(c0 + n + 8, acc01), Store8(c1 + n, acc10);
      Store8(c1 + n + 8, acc11), Store8(c2 + n, acc20), Store8(c2 + n + 8, acc21);
      Store8(c3 + n, acc30), Store8(c3 + n + 8, acc31);
    }
  }
}

// The reductions below keep 8 independent partial results (one vector register) so that
// they vectorize without reassociating a single running sum.
JSK_MULTIVERSION
float ExpShiftedInPlace(float* x, int64_t n, float shift) {
  float partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t j = 0; j < 8; ++j) {
      x[i + j] = FastExp(x[i + j] - shift);
      partial[j] += x[i + j];
    }
  }
  for (; i < n; ++i) {
    x[i] = FastExp(x[i] - shift);
    partial[0] += x[i];
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < 8; ++j) sum += partial[j];
  return sum;
}

JSK_MULTIVERSION
float RowMax(const float* x, int64_t n) {
  constexpr float kNegInf = -__builtin_inff();
  float partial[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int64_t j = 0; j < 8; ++j) partial[j] = x[i + j] > partial[j] ? x[i + j] : partial[j];
  for (; i < n; ++i) partial[0] = x[i] > partial[0] ? x[i] : partial[0];
  float m = kNegInf;
  for (int64_t j = 0; j < 8; ++j) m = partial[j] > m ? partial[j] : m;
  return m;
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
