// Float32 tile primitives of the CPU attention kernels. They see only f32 scratch tiles
// (16-bit inputs are converted when a tile is loaded), so they are plain functions that
// cpu_microkernels.cc compiles twice on x86-64 (baseline and AVX2+FMA, picked at load time).
#pragma once

#include <cstdint>

namespace jax_sparsek::flash {

// Shape granularity of GemmTile: M must be a multiple of kGemmRows, N of kGemmCols.
constexpr int64_t kGemmRows = 4;
constexpr int64_t kGemmCols = 16;

// C[M][N] = A[M][K] * B[K][N] (or += when accumulate). Row-major with leading dimensions.
void GemmTile(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
              int64_t ldb, float* C, int64_t ldc, bool accumulate);

// x[i] = exp(x[i] - shift) for i < n, for arguments x[i] - shift <= ~0 (softmax numerators);
// returns the sum of the new x[i]. Polynomial exp, relative error below 2e-7; results under
// 2^-126 flush to zero.
float ExpShiftedInPlace(float* x, int64_t n, float shift);

// max(x[0], ..., x[n-1]), -inf for n = 0.
float RowMax(const float* x, int64_t n);

// ds[i] = p[i] * (dp[i] - delta) for i < n (the softmax backward of one row).
void SoftmaxGradRow(const float* p, const float* dp, float delta, float* ds, int64_t n);

// y[i] *= alpha for i < n.
void ScaleRow(float* y, int64_t n, float alpha);

// y[i] += x[i] for i < n.
void AddRow(const float* x, float* y, int64_t n);

}  // namespace jax_sparsek::flash
