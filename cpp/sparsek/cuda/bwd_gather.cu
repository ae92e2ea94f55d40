// SparseK backward on Hopper; matches BackwardItem in sparsek/attention_cpu.cc. With
// P_ij = g_ij exp(s_ij - lse_i), delta_i = do_i . o_i and dS_ij = P_ij (do_i . v_j - delta_i):
// dv_j += P_ij do_i, dk_j += scale dS_ij q_i, dq_i += scale dS_ij k_j; the scores get
// dm_ij = exp(s_ij - lse_i)(do_i . v_j - delta_i) from every soft key (0 < u_j - tau_i < 1),
// and through tau_i, -G_i / |M_i| on every key of the support M_i (G_i: the sum of query i's dm
// over the heads of its kv group). Launches, all on one stream, sums in the fp32 / fp64 workspace:
//   1. window keys: the flash backward (bwd.cu) in its accumulation mode, which writes every
//      row of dq_accum (unscaled), dk_accum and dv_accum (memset instead when window = 0);
//   2. gather_bwd_kernel: one CTA per (64 queries, query head, batch), 4 warps of 16 query rows
//      (mma.sync m16n8k16). Q and dO of the tile sit in shared memory; the key list of the
//      enclosing 128-query tile (select.cu), less its tail past these queries' candidates,
//      streams in chunks of 64 keys whose K and V rows are gathered
//      with cp.async (the next chunk's gather overlaps this chunk's math). Per chunk: S and dP
//      on tensor cores, gates, P, dS and dm in registers, dq += dS K in registers; P and dS go
//      to shared memory (16-bit) for dV = P^T dO and dK = scale dS^T Q, which are added to the
//      gathered rows with float4 atomics; dm column sums go to du (fp64 atomics), row sums G_i
//      to mask_grad. At the end the CTA adds its dq to its own dq_accum rows;
//   3. the tau term: tau_ranges_kernel (per key l: the query range of bwd_tau.cuh and a
//      difference array of the support sizes), tau_prefix_kernel (per batch and kv head: prefix
//      sums of G_i / |M_i| over the queries), tau_apply_kernel (dscores = du - range sum);
//   4. LaunchScaleTo16Bit (flash backward's): dq = scale * dq_accum, dk, dv in the input dtype.
// Not deterministic: dk, dv and du are summed with atomics in arbitrary order (dq too, in the
// flash part), so results vary in the last bits from run to run.
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "flash_attention/cuda/attention_kernels.h"
#include "flash_attention/cuda/ptx.cuh"
#include "sparsek/cuda/bwd_tau.cuh"
#include "sparsek/cuda/gather.cuh"
#include "sparsek/cuda/gates.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {
namespace {

constexpr int kBM = 64;           // query rows per CTA, 16 per warp
constexpr int kBN = kGatherRows;  // gathered keys per chunk
constexpr int kThreads = kGatherThreads;
static_assert(kBM == kBN && kBM == 16 * (kThreads / 32), "one 16-row slice per warp; square tiles");
static_assert(kTileQueries % kBM == 0 && kTileQueries - kBM <= kThreads,
              "a CTA serves part of one list; TrimFrom covers the other queries' tail");

// ---- workspace ----------------------------------------------------------------------------
struct Workspace {
  float* dq_accum;    // [B, T, N, D] unscaled sum of dS K
  float* dk_accum;    // [B, S, K, D]
  float* dv_accum;    // [B, S, K, D]
  double* mask_grad;  // [B, N, T]  sum over the query's keys of dm (G_i per query head)
  double* du;         // [B, K, S]  direct dscores terms
  int2* key_range;    // [B, K, S]  queries [first, end) whose support holds the key
  int* support_diff;  // [B, K, T]  difference array of the support sizes |M_i|
  double* prefix;     // [B, K, T + 1]  prefix sums of G_i / |M_i|
  size_t bytes;
};

// Pieces 256-byte aligned, in this order, from `base` (null: sizes only).
Workspace CarveWorkspace(const SparsekDims& d, void* base) {
  size_t offset = 0;
  auto take = [&](size_t bytes) -> void* {
    void* at = base ? static_cast<uint8_t*>(base) + offset : nullptr;
    offset += (bytes + 255) / 256 * 256;
    return at;
  };
  const size_t q_rows = size_t(d.B) * d.T * d.N, kv_rows = size_t(d.B) * d.S * d.K;
  const size_t bk_rows = size_t(d.B) * d.K;
  Workspace w;
  w.dq_accum = static_cast<float*>(take(q_rows * d.D * sizeof(float)));
  w.dk_accum = static_cast<float*>(take(kv_rows * d.D * sizeof(float)));
  w.dv_accum = static_cast<float*>(take(kv_rows * d.D * sizeof(float)));
  w.mask_grad = static_cast<double*>(take(q_rows * sizeof(double)));
  w.du = static_cast<double*>(take(kv_rows * sizeof(double)));
  w.key_range = static_cast<int2*>(take(kv_rows * sizeof(int2)));
  w.support_diff = static_cast<int*>(take(bk_rows * d.T * sizeof(int)));
  w.prefix = static_cast<double*>(take(bk_rows * (size_t(d.T) + 1) * sizeof(double)));
  w.bytes = offset;
  return w;
}

// The flash backward's arguments for the window part: shapes, window mask, dtype, scale and
// the tensors; the sums go to the workspace (its accumulation mode).
BwdArgs WindowPartArgs(const BackwardArgs& a, const Workspace& w) {
  const SparsekDims& d = a.dims;
  BwdArgs f;
  f.dims = {d.B, d.T, d.S, d.N, d.K, d.D};
  f.mask = WindowMask(d);
  f.bf16 = a.bf16;
  f.scale = a.scale;
  f.q = a.q;
  f.k = a.k;
  f.v = a.v;
  f.o = a.o;
  f.lse = a.lse;
  f.do_ = a.do_;
  f.dq = a.dq;  // holds the flash kernels' delta until step 4 overwrites it
  f.dk = a.dk;
  f.dv = a.dv;
  f.dq_accum = w.dq_accum;
  f.dk_accum = w.dk_accum;
  f.dv_accum = w.dv_accum;
  return f;
}

// ---- the gather kernel --------------------------------------------------------------------
struct GatherBwdParams {
  SparsekDims dims;
  float scale, scale_log2;
  const uint16_t *q, *k, *v, *o, *dout;  // 16-bit storage
  const float *scores, *tau, *lse;
  const int32_t *kth, *tile_keys, *tile_count, *key_rank;
  float *dq_accum, *dk_accum, *dv_accum;
  double *mask_grad, *du;
};

template <int D>
struct Smem {
  static constexpr uint32_t kTileBytes = kBM * D * 2;  // [64 rows x D] 16-bit (kBM == kBN)
  static constexpr uint32_t kQ = 0, kDO = kQ + kTileBytes;
  static constexpr uint32_t kK = kDO + kTileBytes, kV = kK + 2 * kTileBytes;  // K[2], V[2]
  static constexpr uint32_t kP = kV + 2 * kTileBytes;       // P [kBM queries][kBN keys]
  static constexpr uint32_t kDS = kP + kBM * kBN * 2;       // dS, same shape
  static constexpr uint32_t kKeys = kDS + kBM * kBN * 2;    // int32 [2][kBN]: key index, -1 = padding
  static constexpr uint32_t kScores = kKeys + 2 * kBN * 4;  // fp32 [2][kBN]: u of each key
  // 113 KiB at D = 128, so that two CTAs fit an SM's 228 KiB with the 1 KiB each reserves.
  // The tiles need no alignment beyond 16 bytes to be correct; the 128-byte alignment of the
  // dynamic buffer keeps ldmatrix / stmatrix conflict-free.
  static constexpr int kBytes = kScores + 2 * kBN * 4;
};

// a . b over one 16-bit row split across a quad: thread t4 takes columns [t4 D/4, (t4 + 1) D/4);
// offset < 0 (row past T) gives 0. Every lane of the quad must call it.
template <bool kBf16, int D>
__device__ __forceinline__ float quad_row_dot(const uint16_t* a, const uint16_t* b, int64_t offset,
                                              int t4) {
  float acc = 0.f;
  if (offset >= 0) {
    const uint4* av = reinterpret_cast<const uint4*>(a + offset + t4 * (D / 4));
    const uint4* bv = reinterpret_cast<const uint4*>(b + offset + t4 * (D / 4));
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const uint4 x = av[c], y = bv[c];
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 xf = unpack2<kBf16>(xs[e]), yf = unpack2<kBf16>(ys[e]);
        acc += xf.x * yf.x + xf.y * yf.y;
      }
    }
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  return acc;
}

// Stores four 8x8 16-bit matrices (the inverse of ldsm_x4): lanes 8m..8m+7 give the row
// addresses of matrix m, and every lane holds row lane / 4, columns 2 (lane % 4) + {0, 1} of each.
__device__ __forceinline__ void stsm_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// This lane's tile_addr(0, rows, r0 + lane_row, c0 + lane_col) for an x4 ldmatrix / stmatrix
// (lane_col 0 or 8), valid for r0 % 8 == 0 and c0 % 16 == 0: the swizzle then takes one of four
// lane-constant values, one per (c0 / 16) % 4, so with c0 known at compile time every address of
// the unrolled loops is one of four registers plus an immediate (tile_addr would cost the loops
// a register per distinct address, which this kernel cannot afford next to its accumulators).
struct LaneOffsets {
  uint32_t swizzled[4];
  __device__ __forceinline__ LaneOffsets(int lane_row, int lane_col) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      swizzled[k] = lane_row * 128 + ((((2 * k) | (lane_col / 8)) ^ (lane_row % 8)) << 4);
  }
  __device__ __forceinline__ uint32_t operator()(int rows, int r0, int c0) const {
    return (c0 / 64) * rows * 128 + r0 * 128 + swizzled[(c0 / 16) % 4];
  }
};

// acc (this warp's 16 chunk keys x D, accumulator layout) * factor added to the gathered rows
// of `dst` ([B, S, K, D] fp32) with float4 atomics: lanes t4 and t4 ^ 1 swap halves so that the
// even one holds 4 consecutive columns of row g, the odd one of row g + 8.
template <int D>
__device__ __forceinline__ void add_key_rows(float* dst, const float (&acc)[D / 8][4], float factor,
                                             const int32_t* keys, int warp, int g, int t4,
                                             const SparsekDims& d, int b, int h) {
  const bool odd = t4 & 1;
  const int j = keys[warp * 16 + g + (odd ? 8 : 0)];
  float* row = dst + ((int64_t(b) * d.S + (j >= 0 ? j : 0)) * d.K + h) * D + 2 * (t4 & 2);
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    const float give0 = odd ? acc[nb][0] : acc[nb][2], give1 = odd ? acc[nb][1] : acc[nb][3];
    const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1);
    const float got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
    const float4 x = odd ? make_float4(got0, got1, acc[nb][2], acc[nb][3])
                         : make_float4(acc[nb][0], acc[nb][1], got0, got1);
    if (j >= 0)
      atomicAdd(reinterpret_cast<float4*>(row + nb * 8),
                make_float4(x.x * factor, x.y * factor, x.z * factor, x.w * factor));
  }
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kThreads, 2) gather_bwd_kernel(const GatherBwdParams p) {
  using L = Smem<D>;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t base = smem_u32(smem);
  const uint32_t sQ = base + L::kQ, sDO = base + L::kDO, sK = base + L::kK, sV = base + L::kV;
  const uint32_t sP = base + L::kP, sDS = base + L::kDS;
  int32_t* keys_s = reinterpret_cast<int32_t*>(smem + L::kKeys);
  float* u_s = reinterpret_cast<float*>(smem + L::kScores);

  const SparsekDims& d = p.dims;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int n = blockIdx.y, b = blockIdx.z, h = n / d.group();
  const int r0 = blockIdx.x * kBM;
  TileKeyList list(d, p.tile_keys, p.tile_count, p.key_rank, p.scores, b, h, r0 / kTileQueries);
  // Causal: keys past the last query's candidates belong to the list's later queries.
  const int last_row = min(r0 + kBM, d.T) - 1;
  list.TrimFrom(NumCandidates(last_row, d.T, d.S, d.window, d.causal));
  const int64_t bh = list.bh;
  const int num_chunks = (list.count + kBN - 1) / kBN;
  const float* u_row = list.u;

  // Element offset of query row r0 + r in [B, T, N, D], -1 past T.
  auto query_offset = [&](int r) -> int64_t {
    const int i = r0 + r;
    return i < d.T ? ((int64_t(b) * d.T + i) * d.N + n) * D : -1;
  };
  auto gather_chunk = [&](int stage, int c) {
    list.Gather<D>(d, b, h, c, p.k, p.v, sK + stage * L::kTileBytes, sV + stage * L::kTileBytes,
                   keys_s + stage * kBN, u_s + stage * kBN);
  };
  if (num_chunks > 0) gather_rows<D>(sQ, p.q, sDO, p.dout, query_offset);  // joins chunk 0's group
  gather_chunk(0, 0);
  gather_chunk(1, 1);

  // This thread's rows row_a and row_a + 8: selection, lse in the log2 domain (+inf for rows
  // with no positive gate or past T, so that exp2 gives exactly 0) and delta.
  const int row_a = r0 + warp * 16 + g;
  const float* tau_row = p.tau + bh * d.T;
  const int32_t* kth_row = p.kth + bh * d.T;
  QuerySelection sel[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_a + 8 * ri;
    delta[ri] = quad_row_dot<kBf16, D>(p.o, p.dout, query_offset(i - r0), t4);
    if (i < d.T) {
      sel[ri] = QuerySelection::Load(i, d.T, d.S, d.window, d.causal, u_row, d.K, tau_row, kth_row,
                                     list.rank);
      const float lse = p.lse[(int64_t(b) * d.N + n) * d.T + i];
      lse2[ri] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    } else {
      sel[ri] = QuerySelection::None();
      lse2[ri] = INFINITY;
    }
  }

  // Lane layouts of the x4 ldmatrix / stmatrix calls. A order (A operands; B operands read
  // transposed): lanes 0-15 address rows 0-15 at column 0, lanes 16-31 rows 0-15 at column 8.
  // B order (B operands; A operands read transposed): lanes 0-7 rows 0-7 and 8-15 rows 0-7 at
  // columns 0 and 8, lanes 16-23 and 24-31 rows 8-15 at columns 0 and 8.
  const LaneOffsets a_order(lane % 16, (lane / 16) * 8);
  const LaneOffsets b_order((lane / 16) * 8 + lane % 8, ((lane / 8) % 2) * 8);
  // This warp's keys (columns 16 warp..) of the [query][key] P / dS tiles, B order.
  const uint32_t warp_keys = tile_addr(0, kBM, (lane / 16) * 8 + lane % 8, warp * 16 + ((lane / 8) % 2) * 8);

  float dq[D / 8][4] = {};          // unscaled dS K of this warp's 16 rows
  double row_grad[2] = {0.0, 0.0};  // this thread's share of G_i (summed over the quad at the end)
  double* du_row = p.du + bh * d.S;
  for (int c = 0; c < num_chunks; ++c) {
    const int stage = c & 1;
    cp_async_wait<1>();
    __syncthreads();  // chunk c (and, for c = 0, Q and dO) visible to every warp
    const uint32_t k_s = sK + stage * L::kTileBytes, v_s = sV + stage * L::kTileBytes;
    const int32_t* keys = keys_s + stage * kBN;
    const float* us = u_s + stage * kBN;

    // S = Q K^T and dP = dO V^T for this warp's 16 rows x 64 gathered keys.
    float s[kBN / 8][4] = {}, dp[kBN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], da[4];
      ldsm_x4(qa, sQ + a_order(kBM, warp * 16, kk * 16));
      ldsm_x4(da, sDO + a_order(kBM, warp * 16, kk * 16));
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t kb[4], vb[4];
        ldsm_x4(kb, k_s + b_order(kBN, np * 16, kk * 16));
        ldsm_x4(vb, v_s + b_order(kBN, np * 16, kk * 16));
        mma_16816<kBf16>(s[2 * np], qa, kb[0], kb[1]);
        mma_16816<kBf16>(s[2 * np + 1], qa, kb[2], kb[3]);
        mma_16816<kBf16>(dp[2 * np], da, vb[0], vb[1]);
        mma_16816<kBf16>(dp[2 * np + 1], da, vb[2], vb[3]);
      }
    }

    // Element (row row_a + 8 ri, key column 8 nb + 2 t4 + e) sits at [nb][2 ri + e]. Replace
    // S by P = g exp(s - lse) and dP by dS = P (dP - delta); dm = exp(s - lse)(dP - delta) on
    // soft keys, summed per row (G_i) and per column (du_j: over the warp's 16 rows, lanes of
    // equal t4, then one fp64 atomic per nonzero column and warp). Gate 0 (not selected,
    // padding, rows past T) gives exactly 0 whatever exp(s - lse) is, so padding columns sum to 0.
    float row_dm[2] = {0.f, 0.f};
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nb * 8 + 2 * t4 + e;
        const int j = keys[col];
        const float uj = us[col];
        float col_dm = 0.f;
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const bool selected = j >= 0 && sel[ri].SelectsByScore(j, uj);
          const float gate = sel[ri].Gate(selected, j, uj, d.causal, d.window);
          const float ex = fast_exp2(s[nb][2 * ri + e] * p.scale_log2 - lse2[ri]);
          const float dpd = dp[nb][2 * ri + e] - delta[ri];
          const float pij = gate > 0.f ? gate * ex : 0.f;
          const float dm = gate > 0.f && sel[ri].Soft(uj) ? ex * dpd : 0.f;
          s[nb][2 * ri + e] = pij;
          dp[nb][2 * ri + e] = pij * dpd;
          row_dm[ri] += dm;
          col_dm += dm;
        }
        col_dm += __shfl_xor_sync(0xffffffffu, col_dm, 4);
        col_dm += __shfl_xor_sync(0xffffffffu, col_dm, 8);
        col_dm += __shfl_xor_sync(0xffffffffu, col_dm, 16);
        if (g == 0 && col_dm != 0.f) atomicAdd(du_row + j, double(col_dm));
      }
    }
    row_grad[0] += row_dm[0];
    row_grad[1] += row_dm[1];

    // P and dS (16-bit, [query][key]) to shared memory for the key-major products below, and
    // dq += dS K with dS as the A operand and the K rows read transposed.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4], dsa[4];
      pack_a<kBf16>(pa, s, kk);
      pack_a<kBf16>(dsa, dp, kk);
      stsm_x4(sP + a_order(kBM, warp * 16, kk * 16), pa);
      stsm_x4(sDS + a_order(kBM, warp * 16, kk * 16), dsa);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t kb[4];
        ldsm_x4_trans(kb, k_s + a_order(kBN, kk * 16, np * 16));
        mma_16816<kBf16>(dq[2 * np], dsa, kb[0], kb[1]);
        mma_16816<kBf16>(dq[2 * np + 1], dsa, kb[2], kb[3]);
      }
    }
    __syncthreads();  // P and dS of all 64 queries written

    // Warp w: keys 16 w .. 16 w + 15 of the chunk. dV = P^T dO, then dK = scale dS^T Q, over
    // the 64 queries: P^T / dS^T and dO / Q all read transposed from their [query][*] tiles.
#pragma unroll 1
    for (int pass = 0; pass < 2; ++pass) {
      const uint32_t a_tile = pass == 0 ? sP : sDS, b_tile = pass == 0 ? sDO : sQ;
      float acc[D / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, a_tile + warp_keys + kk * 16 * 128);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t bf[4];
          ldsm_x4_trans(bf, b_tile + a_order(kBM, kk * 16, np * 16));
          mma_16816<kBf16>(acc[2 * np], a, bf[0], bf[1]);
          mma_16816<kBf16>(acc[2 * np + 1], a, bf[2], bf[3]);
        }
      }
      add_key_rows<D>(pass == 0 ? p.dv_accum : p.dk_accum, acc, pass == 0 ? 1.f : p.scale, keys,
                      warp, g, t4, d, b, h);
    }
    __syncthreads();  // every warp is done with this stage, P and dS: refill
    gather_chunk(stage, c + 2);
  }

  // Epilogue: dq_accum rows += dq (this CTA owns its rows; the flash part finished earlier on
  // the stream), mask_grad = G_i of this query head.
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_a + 8 * ri;
    double grad = row_grad[ri];
    grad += __shfl_xor_sync(0xffffffffu, grad, 1);
    grad += __shfl_xor_sync(0xffffffffu, grad, 2);
    if (i >= d.T) continue;
    if (t4 == 0) p.mask_grad[(int64_t(b) * d.N + n) * d.T + i] = grad;
    if (num_chunks == 0) continue;
    float* row = p.dq_accum + query_offset(i - r0) + 2 * t4;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      float2* at = reinterpret_cast<float2*>(row + nb * 8);
      const float2 x = *at;
      *at = make_float2(x.x + dq[nb][2 * ri], x.y + dq[nb][2 * ri + 1]);
    }
  }
}

// ---- the tau term -----------------------------------------------------------------------
struct TauParams {
  SparsekDims dims;
  const float *scores, *tau;
  const double *mask_grad, *du;
  int2* key_range;
  int* support_diff;
  double* prefix;
  float* dscores;
};

constexpr int kKeyThreads = 256;  // tau_ranges_kernel, tau_apply_kernel: one key per thread

// Adds `value` at index `at` (>= 0; < 0: nothing) with one atomic per distinct index of the warp
// (non-causal ranges all start at query 0). Every lane must call it.
__device__ __forceinline__ void warp_add(int* base, int at, int value) {
  const unsigned same = __match_any_sync(0xffffffffu, at);
  if (at >= 0 && (threadIdx.x % 32) == __ffs(same) - 1) atomicAdd(base + at, value * __popc(same));
}

// Per key l of (b, kv head): its query range, and +1 / -1 at its ends in the difference array.
__global__ void __launch_bounds__(kKeyThreads) tau_ranges_kernel(const TauParams p) {
  const SparsekDims& d = p.dims;
  const int l = blockIdx.x * kKeyThreads + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = int64_t(b) * d.K + h;
  QueryRange r{0, 0};
  if (l < d.S) {
    r = SupportQueries(p.tau + bh * d.T, d.T, d.S, d.window, d.causal, l,
                       p.scores[(int64_t(b) * d.S + l) * d.K + h]);
    p.key_range[bh * d.S + l] = make_int2(r.first, r.end);
  }
  const bool any = r.first < r.end;
  int* diff = p.support_diff + bh * d.T;
  warp_add(diff, any ? r.first : -1, 1);
  warp_add(diff, any && r.end < d.T ? r.end : -1, -1);  // index T is never read
}

constexpr int kScanThreads = 512, kScanItems = 4;  // 2048 queries per step

// Carries a running total across the steps of a block-wide scan (cub's prefix callback).
template <typename T>
struct RunningTotal {
  T total;
  __device__ T operator()(T step_total) {
    const T before = total;
    total += step_total;
    return before;
  }
};

// Per (b, kv head): |M_i| = prefix sum of the difference array, G_i = sum over the group's query
// heads of mask_grad, prefix[i + 1] = prefix[i] + G_i / |M_i| (0 when M_i is empty), in fp64.
__global__ void __launch_bounds__(kScanThreads) tau_prefix_kernel(const TauParams p) {
  using IntScan = cub::BlockScan<int, kScanThreads>;
  using DoubleScan = cub::BlockScan<double, kScanThreads>;
  __shared__ union {
    typename IntScan::TempStorage ints;
    typename DoubleScan::TempStorage doubles;
  } scratch;
  const SparsekDims& d = p.dims;
  const int h = blockIdx.x, b = blockIdx.y, G = d.group();
  const int64_t bh = int64_t(b) * d.K + h;
  const int* diff = p.support_diff + bh * d.T;
  const double* grad = p.mask_grad + (int64_t(b) * d.N + int64_t(h) * G) * d.T;  // head hh at + hh T
  double* prefix = p.prefix + bh * (int64_t(d.T) + 1);
  if (threadIdx.x == 0) prefix[0] = 0.0;
  RunningTotal<int> size_carry{0};
  RunningTotal<double> prefix_carry{0.0};
  for (int i0 = 0; i0 < d.T; i0 += kScanThreads * kScanItems) {
    const int first = i0 + threadIdx.x * kScanItems;  // this thread's queries: first + k
    int size[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) size[k] = first + k < d.T ? diff[first + k] : 0;
    IntScan(scratch.ints).InclusiveSum(size, size, size_carry);
    __syncthreads();  // scratch reused
    double term[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int i = first + k;
      double g_i = 0.0;
      if (i < d.T && size[k] > 0)
        for (int hh = 0; hh < G; ++hh) g_i += grad[int64_t(hh) * d.T + i];
      term[k] = size[k] > 0 ? g_i / size[k] : 0.0;
    }
    DoubleScan(scratch.doubles).InclusiveSum(term, term, prefix_carry);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kScanItems; ++k)
      if (first + k < d.T) prefix[first + k + 1] = term[k];
  }
}

// dscores[b, l, h] = du_l - (prefix[end_l] - prefix[first_l]).
__global__ void __launch_bounds__(kKeyThreads) tau_apply_kernel(const TauParams p) {
  const SparsekDims& d = p.dims;
  const int l = blockIdx.x * kKeyThreads + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (l >= d.S) return;
  const int64_t bh = int64_t(b) * d.K + h;
  const int2 r = p.key_range[bh * d.S + l];
  const double* prefix = p.prefix + bh * (int64_t(d.T) + 1);
  const double tau_term = r.x < r.y ? prefix[r.y] - prefix[r.x] : 0.0;
  p.dscores[(int64_t(b) * d.S + l) * d.K + h] = float(p.du[bh * d.S + l] - tau_term);
}

template <bool kBf16, int D>
cudaError_t LaunchGather(const BackwardArgs& a, const Workspace& w, cudaStream_t stream) {
  const SparsekDims& d = a.dims;
  const GatherBwdParams p{d, a.scale, a.scale * kLog2e,
                          static_cast<const uint16_t*>(a.q), static_cast<const uint16_t*>(a.k),
                          static_cast<const uint16_t*>(a.v), static_cast<const uint16_t*>(a.o),
                          static_cast<const uint16_t*>(a.do_), a.scores, a.tau, a.lse, a.kth,
                          a.tile_keys, a.tile_count, a.key_rank, w.dq_accum, w.dk_accum, w.dv_accum,
                          w.mask_grad, w.du};
  auto kernel = gather_bwd_kernel<kBf16, D>;
  constexpr int smem = Smem<D>::kBytes;
  cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3((d.T + kBM - 1) / kBM, d.N, d.B), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t BackwardWorkspaceBytes(const SparsekDims& dims) { return CarveWorkspace(dims, nullptr).bytes; }

cudaError_t LaunchSparsekBackward(const BackwardArgs& a, cudaStream_t stream, std::string* error) {
  const SparsekDims& d = a.dims;
  const size_t q_elems = size_t(d.B) * d.T * d.N * d.D, kv_elems = size_t(d.B) * d.S * d.K * d.D;
  const size_t score_elems = size_t(d.B) * d.S * d.K;
  cudaError_t err = cudaSuccess;
  if (q_elems == 0 || kv_elems == 0) {  // no queries or no keys: every gradient is zero
    if (q_elems) err = cudaMemsetAsync(a.dq, 0, q_elems * 2, stream);
    if (err == cudaSuccess && kv_elems) err = cudaMemsetAsync(a.dk, 0, kv_elems * 2, stream);
    if (err == cudaSuccess && kv_elems) err = cudaMemsetAsync(a.dv, 0, kv_elems * 2, stream);
    if (err == cudaSuccess && score_elems) err = cudaMemsetAsync(a.dscores, 0, score_elems * 4, stream);
    return err;
  }
  if (d.D != 64 && d.D != 128) {
    *error = "head dim D=" + std::to_string(d.D) + " is not supported (64 or 128)";
    return cudaErrorInvalidValue;
  }
  const Workspace w = CarveWorkspace(d, a.workspace);
  if (a.workspace_bytes < w.bytes) {
    *error = "workspace of " + std::to_string(a.workspace_bytes) + " bytes, need " + std::to_string(w.bytes);
    return cudaErrorInvalidValue;
  }
  const size_t bk_rows = size_t(d.B) * d.K;
  if ((err = cudaMemsetAsync(w.du, 0, score_elems * sizeof(double), stream)) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(w.support_diff, 0, bk_rows * d.T * sizeof(int), stream)) != cudaSuccess) return err;

  // 1. Window keys (gate 1), or zero sums.
  if (d.window > 0) {
    if ((err = LaunchFlashBackward(WindowPartArgs(a, w), stream, error)) != cudaSuccess) return err;
  } else {
    if ((err = cudaMemsetAsync(w.dq_accum, 0, q_elems * sizeof(float), stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(w.dk_accum, 0, kv_elems * sizeof(float), stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(w.dv_accum, 0, kv_elems * sizeof(float), stream)) != cudaSuccess) return err;
  }

  // 2. Gathered keys.
  if (d.D == 64) {
    err = a.bf16 ? LaunchGather<true, 64>(a, w, stream) : LaunchGather<false, 64>(a, w, stream);
  } else {
    err = a.bf16 ? LaunchGather<true, 128>(a, w, stream) : LaunchGather<false, 128>(a, w, stream);
  }
  if (err != cudaSuccess) return err;

  // 3. The tau term and dscores.
  const TauParams t{d, a.scores, a.tau, w.mask_grad, w.du, w.key_range, w.support_diff, w.prefix, a.dscores};
  const dim3 key_grid(unsigned((d.S + kKeyThreads - 1) / kKeyThreads), d.K, d.B);
  tau_ranges_kernel<<<key_grid, kKeyThreads, 0, stream>>>(t);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  tau_prefix_kernel<<<dim3(d.K, d.B), kScanThreads, 0, stream>>>(t);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  tau_apply_kernel<<<key_grid, kKeyThreads, 0, stream>>>(t);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // 4. The 16-bit gradients.
  auto convert = [&](const float* src, void* dst, size_t elements, float scale) {
    return LaunchScaleTo16Bit(src, dst, int64_t(elements), scale, a.bf16, stream);
  };
  if ((err = convert(w.dq_accum, a.dq, q_elems, a.scale)) != cudaSuccess) return err;
  if ((err = convert(w.dk_accum, a.dk, kv_elems, 1.f)) != cudaSuccess) return err;
  return convert(w.dv_accum, a.dv, kv_elems, 1.f);
}

}  // namespace jax_sparsek::cuda::sparsek
