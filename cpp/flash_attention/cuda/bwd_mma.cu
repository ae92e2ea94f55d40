// Portable backward kernel (FlashAttention-2 style, mma.sync m16n8k16), the reference point for
// the Hopper one (bwd_wgmma.cu; JAX_SPARSEK_CUDA_BWD_KERNEL=mma selects this one). One CTA per
// (128-key tile, kv head, batch), 8 warps of 16 keys each. K and V stay in shared memory; for
// every query head of the kv head's group and every query tile (64 rows) that sees the key
// tile, Q and dO stream through a two-stage TMA pipeline, and the CTA accumulates dK and dV in
// registers (no atomics, deterministic) and adds its dQ share to the fp32 workspace with
// atomics (in deterministic mode one key tile after the other: bwd_common.cuh's DqTurns).
#include "bwd_common.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = kBwdQueries, kBN = kBwdKeys;
constexpr int kWarps = 8, kThreads = kWarps * 32;

template <int D>
struct Smem {
  static constexpr uint32_t kKVBytes = kBN * D * 2, kQBytes = kBM * D * 2;
  static constexpr uint32_t kK = 0, kV = kK + kKVBytes, kQ = kV + kKVBytes;  // Q[2]
  static constexpr uint32_t kDO = kQ + 2 * kQBytes;                           // dO[2]
  static constexpr uint32_t kDS = kDO + 2 * kQBytes;       // dS^T [kBN keys][kBM queries]
  static constexpr uint32_t kLse = kDS + kBN * kBM * 2;    // [2][kBM] fp32, log2 domain
  static constexpr uint32_t kDelta = kLse + 2 * kBM * 4;   // [2][kBM] fp32
  static constexpr uint32_t kBars = kDelta + 2 * kBM * 4;  // kv, qdo[2]
  static constexpr uint32_t kNextTurn = kBars + 3 * 8;    // Step (deterministic dQ)
  static constexpr int kBytes = 1024 + kNextTurn + 8;
};

// kDeterministic is a template parameter: its turns cost the default kernel no registers.
template <bool kBf16, int D, bool kDeterministic>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
               const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
               const BwdKernelParams p) {
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sK = base + L::kK, sV = base + L::kV, sQ = base + L::kQ, sDO = base + L::kDO;
  const uint32_t sDS = base + L::kDS;
  float* lse_s = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kLse);
  float* delta_s = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kDelta);
  const uint32_t bar_kv = base + L::kBars, bar_qdo = bar_kv + 8;  // bar_qdo[2]
  Step* dq_next_turn = reinterpret_cast<Step*>(smem_raw + (base - smem_u32(smem_raw)) + L::kNextTurn);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int key_tile = kDeterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int c0 = key_tile * kBN;
  const TileRange qt = query_tiles(p.mask, c0, kBN, kBM);

  if (tid == 0) {
    if constexpr (kDeterministic) *dq_next_turn = {0, qt.first};
    mbar_init(bar_kv, 1);
    mbar_init(bar_qdo, 1);
    mbar_init(bar_qdo + 8, 1);
    fence_barrier_init();
  }
  __syncthreads();

  auto load_qdo = [&](int stage, Step st) {
    const uint32_t bar = bar_qdo + 8 * stage;
    const int h = kvh * p.group + st.hh;
    mbar_arrive_expect_tx(bar, 2 * L::kQBytes);
    tma_load_tile<kBM, D>(sQ + stage * L::kQBytes, &tm_q, bar, st.m * kBM, h, b);
    tma_load_tile<kBM, D>(sDO + stage * L::kQBytes, &tm_do, bar, st.m * kBM, h, b);
  };
  auto store_stat = [&](int stage, int t, float v) {
    if (t < kBM) lse_s[stage * kBM + t] = v;
    else delta_s[stage * kBM + t - kBM] = v;
  };

  Step cur = next_step(p, b, kvh, c0, qt, 0, qt.first);
  Step nxt = cur.hh < p.group ? next_step(p, b, kvh, c0, qt, cur.hh, cur.m + 1) : cur;
  if (tid == 0 && cur.hh < p.group) {
    mbar_arrive_expect_tx(bar_kv, 2 * L::kKVBytes);
    tma_load_tile<kBN, D>(sK, &tm_k, bar_kv, c0, kvh, b);
    tma_load_tile<kBN, D>(sV, &tm_v, bar_kv, c0, kvh, b);
    load_qdo(0, cur);
    if (nxt.hh < p.group) load_qdo(1, nxt);
  }
  if (tid < 2 * kBM) {
    store_stat(0, tid, row_stat(p, b, kvh, cur, tid));
    store_stat(1, tid, row_stat(p, b, kvh, nxt, tid));
  }
  __syncthreads();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  if (cur.hh < p.group) mbar_wait(bar_kv, 0);
  const int key_a = c0 + warp * 16 + g;  // this thread's keys: key_a, key_a + 8
  const Interval key_queries[2] = {key_rows(p.mask, key_a), key_rows(p.mask, key_a + 8)};
  const DqTurns turns{&p, b, kvh, key_tile, qt, dq_next_turn};

  for (int it = 0; cur.hh < p.group; ++it) {
    const int stage = it & 1;
    mbar_wait(bar_qdo + 8 * stage, (it >> 1) & 1);
    const uint32_t q_s = sQ + stage * L::kQBytes, do_s = sDO + stage * L::kQBytes;
    const int h = kvh * p.group + cur.hh, q0 = cur.m * kBM;
    const uint8_t* mask = p.mask.mask_for(b, h);
    const bool partial = tile_status(p.mask, mask, q0, kBM, c0, kBN) == kTilePartial;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float st[kBM / 8][4] = {}, dpt[kBM / 8][4] = {};
#pragma unroll 1
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      const int a_row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, a_col = kk * 16 + (lane / 16) * 8;
      ldsm_x4(ka, tile_addr(sK, kBN, a_row, a_col));
      ldsm_x4(va, tile_addr(sV, kBN, a_row, a_col));
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        const int b_row = np * 16 + (lane / 16) * 8 + (lane % 8), b_col = kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t qb[4], ob[4];
        ldsm_x4(qb, tile_addr(q_s, kBM, b_row, b_col));
        ldsm_x4(ob, tile_addr(do_s, kBM, b_row, b_col));
        mma_16816<kBf16>(st[2 * np], ka, qb[0], qb[1]);
        mma_16816<kBf16>(st[2 * np + 1], ka, qb[2], qb[3]);
        mma_16816<kBf16>(dpt[2 * np], va, ob[0], ob[1]);
        mma_16816<kBf16>(dpt[2 * np + 1], va, ob[2], ob[3]);
      }
    }

    // P^T and dS^T (fp32, in place).
    probabilities(st, p, lse_s + stage * kBM, partial, mask, q0, key_a, t4, key_queries);
    dscores(st, dpt, delta_s + stage * kBM, t4);

    // 16-bit A fragments (the fp32 scores die); dS^T to shared memory for the dQ product.
    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
    pack_p_ds<kBf16>(st, dpt, pa, da, sDS, warp * 16 + g, t4);
    // dV += P^T dO and dK += dS^T Q (contraction over the 64 queries).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const int b_row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        const int b_col = np * 16 + (lane / 16) * 8;
        uint32_t ob[4], qb[4];
        ldsm_x4_trans(ob, tile_addr(do_s, kBM, b_row, b_col));
        ldsm_x4_trans(qb, tile_addr(q_s, kBM, b_row, b_col));
        mma_16816<kBf16>(dv[2 * np], pa[kk], ob[0], ob[1]);
        mma_16816<kBf16>(dv[2 * np + 1], pa[kk], ob[2], ob[3]);
        mma_16816<kBf16>(dk[2 * np], da[kk], qb[0], qb[1]);
        mma_16816<kBf16>(dk[2 * np + 1], da[kk], qb[2], qb[3]);
      }
    }
    __syncthreads();  // (A) dS^T complete; Q / dO of this stage no longer read

    Step after = nxt.hh < p.group ? next_step(p, b, kvh, c0, qt, nxt.hh, nxt.m + 1) : nxt;
    if (tid == 0 && after.hh < p.group) load_qdo(stage, after);
    const float stat_prefetch = tid < 2 * kBM ? row_stat(p, b, kvh, after, tid) : 0.f;

    // dQ (64 queries x D) += dS K: warp w takes queries 16 (w % 4).., columns (w / 4) D/2...
    {
      const int q_row0 = (warp % 4) * 16, d0 = (warp / 4) * (D / 2);
      float dq[D / 16][4] = {};
#pragma unroll 1
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, tile_addr(sDS, kBN, kk * 16 + (lane % 8) + (lane / 16) * 8,
                                   q_row0 + ((lane / 8) % 2) * 8));
#pragma unroll
        for (int np = 0; np < D / 32; ++np) {
          uint32_t kb[4];
          ldsm_x4_trans(kb, tile_addr(sK, kBN, kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                      d0 + np * 16 + (lane / 16) * 8));
          mma_16816<kBf16>(dq[2 * np], a, kb[0], kb[1]);
          mma_16816<kBf16>(dq[2 * np + 1], a, kb[2], kb[3]);
        }
      }
      if constexpr (kDeterministic) {
        if (tid == 0) turns.take_turn(cur);
        __syncthreads();  // every thread adds after the previous key tiles
      }
      add_dq<D>(p, dq, b, h, q0, q_row0 + g, d0, t4);
    }
    if (tid < 2 * kBM) store_stat(stage, tid, stat_prefetch);
    __syncthreads();  // (B) dS^T reads done; next stage's statistics visible; dQ added
    if constexpr (kDeterministic) {
      if (tid == 0) turns.pass(cur);
    }
    cur = nxt;
    nxt = after;
  }

  if constexpr (kDeterministic) {
    if (tid == 0 && qt.first < qt.end) turns.pass_before({p.group, qt.first});
  }

  store_dk_dv<kBf16, D>(p, dk, dv, b, kvh, key_a, t4);
}

template <bool kBf16, int D>
cudaError_t Launch(const BwdLaunch& l, cudaStream_t stream) {
  return LaunchBwdKernel(bwd_kernel<kBf16, D, false>, bwd_kernel<kBf16, D, true>, kThreads,
                         Smem<D>::kBytes, l, stream);
}

}  // namespace

cudaError_t LaunchBwdMma(const BwdLaunch& l, cudaStream_t stream) {
  if (l.D == 64) return l.bf16 ? Launch<true, 64>(l, stream) : Launch<false, 64>(l, stream);
  return l.bf16 ? Launch<true, 128>(l, stream) : Launch<false, 128>(l, stream);
}

}  // namespace jax_sparsek::cuda
