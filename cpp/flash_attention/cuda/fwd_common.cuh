// Pieces both forward kernels share: kernel parameters and the online softmax over a tile of
// scores held in the tensor-core accumulator layout (mma.sync m16n8 and wgmma m64nN agree:
// a thread holds rows g and g + 8 of its warp's 16 rows, columns 8 * j + 2 * (lane % 4) + {0, 1}).
#pragma once

#include <cstdint>

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
// With `weight` (in [0, 1]; SparseK's gates), p = weight * exp2(s - m_new): the max is taken
// over the unweighted scores, which keeps p <= 1 and costs no log2 per element.
template <int NB>
__device__ __forceinline__ void softmax_update_log2(float (&s)[NB][4], float (&m_run)[2],
                                                    float (&l_run)[2], float (&alpha)[2],
                                                    const float (*weight)[4] = nullptr) {
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
      if (weight) {
        s[j][2 * ri] *= weight[j][2 * ri];
        s[j][2 * ri + 1] *= weight[j][2 * ri + 1];
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

// This warp's 16 rows of the Q tile at q_s (kBM rows, tile format) as A fragments for add_qk.
template <int D, int kBM>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[D / 16][4], uint32_t q_s, int warp,
                                                 int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldsm_x4(qf[kk], tile_addr(q_s, kBM, warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                              kk * 16 + (lane / 16) * 8));
  }
}

// S += Q K^T for this warp's 16 rows (Q as A fragments in registers) and the kBN x D key tile
// at k_s (tile format).
template <bool kBf16, int D, int kBN>
__device__ __forceinline__ void add_qk(float (&s)[kBN / 8][4], const uint32_t (&qf)[D / 16][4],
                                       uint32_t k_s, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kBN / 16; ++np) {
      uint32_t kb[4];
      ldsm_x4(kb, tile_addr(k_s, kBN, np * 16 + (lane / 16) * 8 + (lane % 8),
                            kk * 16 + ((lane / 8) % 2) * 8));
      mma_16816<kBf16>(s[2 * np], qf[kk], kb[0], kb[1]);
      mma_16816<kBf16>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
    }
  }
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

// O = alpha * O + P V for this warp's 16 rows: P (16 x kBN probabilities in the accumulator
// layout, converted to 16-bit A fragments) times the kBN x D value tile at v_s (tile format).
template <bool kBf16, int D, int kBN>
__device__ __forceinline__ void rescale_and_add_pv(float (&o_acc)[D / 8][4], const float (&s)[kBN / 8][4],
                                                   const float (&alpha)[2], uint32_t v_s, int lane) {
  rescale_rows<D>(o_acc, alpha);
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    uint32_t a[4];
    pack_a<kBf16>(a, s, kk);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t vb[4];
      ldsm_x4_trans(vb, tile_addr(v_s, kBN, kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                  np * 16 + (lane / 16) * 8));
      mma_16816<kBf16>(o_acc[2 * np], a, vb[0], vb[1]);
      mma_16816<kBf16>(o_acc[2 * np + 1], a, vb[2], vb[3]);
    }
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
