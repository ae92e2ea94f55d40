// Pieces the forward kernels share (fwd_mma.cu, fwd_wgmma.cu, SparseK's fwd_gather.cu): kernel
// parameters and the online softmax over a tile of scores held in the tensor-core accumulator
// layout (mma.sync m16n8 and wgmma m64nN agree:
// a thread holds rows g and g + 8 of its warp's 16 rows, columns 8 * j + 2 * (lane % 4) + {0, 1}).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_kernels.h"
#include "masking.cuh"
#include "ptx.cuh"

namespace jax_sparsek::cuda {

struct FwdKernelParams {
  MaskSpec mask;
  int N, group;      // query heads, query heads per kv head
  float scale_log2;  // scale * log2(e): scores live in the log2 domain
  void* o;           // [B, T, N, D] (the mma.sync kernel stores it directly)
  float* lse;        // [B, N, T]
};

inline FwdKernelParams MakeFwdKernelParams(const FwdArgs& a) {
  return {a.mask, a.dims.N, a.dims.group(), a.scale * kLog2e, a.o, a.lse};
}

// Masking state of a thread's two query rows (row_a and row_a + 8) for partial tiles: each
// row's visible key interval, computed once per query tile, and the block mask if any.
struct RowMasks {
  const uint8_t* mask;  // MaskSpec::mask_for(b, h), null for dense masks
  Interval keys[2];
  int row_a;
  int T, S, bq, bk, cols;  // copied from the MaskSpec (no pointer into kernel parameters)

  __device__ __forceinline__ RowMasks(const MaskSpec& m, const uint8_t* mk, int row)
      : mask(mk), keys{row_keys(m, row), row_keys(m, row + 8)}, row_a(row), T(m.T), S(m.S),
        bq(m.bq), bk(m.bk), cols(m.cols) {}
};

// Sets to -inf the scores s[j][v] (row row_a + 8 * (v / 2), key col0 + 8 * j + (v % 2)) that
// the row does not see: two compares per element, plus a block-mask lookup when the tile
// straddles mask blocks (block sizes that are not multiples of the tile).
template <int NB>
__device__ __forceinline__ void mask_tile(float (&s)[NB][4], const RowMasks& rm, int col0) {
#pragma unroll
  for (int j = 0; j < NB; ++j) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int col = col0 + 8 * j + (v & 1);
      const Interval& r = rm.keys[v >> 1];
      s[j][v] = (col >= r.lo && col <= r.hi) ? s[j][v] : -INFINITY;
    }
  }
  if (rm.mask) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int i = rm.row_a + 8 * ri;
      if (i >= rm.T) continue;
      const uint8_t* mask_row = rm.mask + int64_t(i / rm.bq) * rm.cols;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + 8 * j + e;
          if (col < rm.S && !mask_row[col / rm.bk]) s[j][2 * ri + e] = -INFINITY;
        }
      }
    }
  }
}

// One online-softmax step over scores already in the log2 domain and masked (-inf = not
// seen): replaces them by exp2(s - m_new) and returns alpha = exp2(m_old - m_new) per row for
// rescaling O. l_run stays a per-thread partial sum (reduced across the quad once, in
// finalize_rows). Rows with no visible key so far keep m = -inf and produce p = 0, never NaN.
// With a `weight` (weight(j, v) in [0, 1] for s[j][v]; SparseK's gates),
// p = weight * exp2(s - m_new): the max is taken over the unweighted scores, which keeps p <= 1
// and costs no log2 per element.
struct NoWeight {};
template <int NB, typename Weight = NoWeight>
__device__ __forceinline__ void softmax_update_log2(float (&s)[NB][4], float (&m_run)[2],
                                                    float (&l_run)[2], float (&alpha)[2],
                                                    Weight weight = {}) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * ri], s[j][2 * ri + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[ri], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[ri] = fast_exp2(m_run[ri] - m_use);
    m_run[ri] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      s[j][2 * ri] = fast_exp2(s[j][2 * ri] - m_use);
      s[j][2 * ri + 1] = fast_exp2(s[j][2 * ri + 1] - m_use);
      if constexpr (!std::is_same_v<Weight, NoWeight>) {
        s[j][2 * ri] *= weight(j, 2 * ri);
        s[j][2 * ri + 1] *= weight(j, 2 * ri + 1);
      }
      sum += s[j][2 * ri] + s[j][2 * ri + 1];
    }
    l_run[ri] = l_run[ri] * alpha[ri] + sum;
  }
}

// The same step on raw scores s[j][v] (row row_a + 8 * (v / 2), key col0 + 8 * j + (v % 2)):
// scales them into the log2 domain and, for partial tiles, masks them first.
template <int NB>
__device__ __forceinline__ void softmax_update(float (&s)[NB][4], float (&m_run)[2],
                                               float (&l_run)[2], float (&alpha)[2],
                                               float scale_log2, bool partial, const RowMasks& rm,
                                               int col0) {
#pragma unroll
  for (int j = 0; j < NB; ++j) {
#pragma unroll
    for (int v = 0; v < 4; ++v) s[j][v] *= scale_log2;
  }
  if (partial) mask_tile(s, rm, col0);
  softmax_update_log2(s, m_run, l_run, alpha);
}

// O *= alpha per row (the online softmax's correction when a row's maximum grows).
template <int D>
__device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    o[nb][0] *= alpha[0];
    o[nb][1] *= alpha[0];
    o[nb][2] *= alpha[1];
    o[nb][3] *= alpha[1];
  }
}

// Row normalizers and natural-log LSE (-inf and a zero output for rows that saw no key).
__device__ __forceinline__ void finalize_rows(const float (&m_run)[2], const float (&l_run)[2],
                                              float (&inv)[2], float (&lse)[2]) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float l = l_run[ri];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[ri] = l > 0.f ? 1.f / l : 0.f;
    lse[ri] = l > 0.f ? (m_run[ri] + __log2f(l)) * kLn2 : -INFINITY;
  }
}

}  // namespace jax_sparsek::cuda
