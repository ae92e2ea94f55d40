// Hopper backward kernel (FlashAttention-3's split of the work). One CTA per (128-key tile, kv
// head, batch), three warpgroups:
//   producer (warpgroup 0): K and V of the tile once by TMA, then for every step (query head of
//     the group, 64-row query tile that sees the keys; bwd_common.cuh's next_step) Q, dO and
//     the rows' lse / delta through two stages (full / empty mbarriers);
//   two consumers (warpgroups 1-2), 64 keys each, dK and dV of their keys in registers. Per
//     step, all by wgmma:
//       S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries, operands in shared memory); the
//       softmax gradient of S^T runs while dP^T is in flight;
//       dV += P^T dO and dK += dS^T Q with P^T and dS^T straight from registers;
//       dS^T also to shared memory, then dQ = dS K from it: with D = 128 consumer c takes D's
//       columns [64 c, 64 c + 64) over all 128 keys (both consumers' dS^T: a named barrier),
//       with D = 64 all columns over its own 64 keys; the consumer adds its share to the fp32
//       workspace with atomics (deterministic mode: in a fixed order, DqTurns).
// dS^T has two buffers: a consumer writes step it + 1's only after the barrier of step it,
// which the other consumer reaches after its step it - 1 dQ product has read that buffer.
#include "bwd_common.cuh"
#include "fwd_wgmma.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = kBwdQueries, kBN = kBwdKeys, kThreads = kWgmmaThreads;
// Named barrier ids (0 is __syncthreads): both consumers' dS^T written; deterministic dQ turns.
constexpr int kBarDs = 1, kBarDqTurn = 2;

template <int D>
struct Smem {
  static constexpr uint32_t kKVBytes = kBN * D * 2, kQBytes = kBM * D * 2, kDsBytes = kBN * kBM * 2;
  static constexpr uint32_t kK = 0, kV = kK + kKVBytes, kQ = kV + kKVBytes;  // Q[2]
  static constexpr uint32_t kDO = kQ + 2 * kQBytes;                           // dO[2]
  static constexpr uint32_t kDS = kDO + 2 * kQBytes;        // dS^T[2]: [kBN keys][kBM queries]
  static constexpr uint32_t kLse = kDS + 2 * kDsBytes;      // [2][kBM] fp32, log2 domain
  static constexpr uint32_t kDelta = kLse + 2 * kBM * 4;    // [2][kBM] fp32
  static constexpr uint32_t kBars = kDelta + 2 * kBM * 4;   // kv, full[2], empty[2]
  static constexpr uint32_t kNextTurn = kBars + 5 * 8;     // Step (deterministic dQ)
  static constexpr int kBytes = 1024 + kNextTurn + 8;
};

// X^T = A B^T for one consumer: its 64 rows of the key-tile operand A (K or V: a_rows, panel 0
// of the 128-row tile) times the step's 64-row operand B (Q or dO), D/16 wgmmas, one commit
// group.
template <bool kBf16, int D>
__device__ __forceinline__ void issue_keys_x_queries(float (&x)[kBM / 8][4], uint32_t a_rows,
                                                     uint32_t b_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t col = (kk % 4) * 32;  // 16-column step inside a 64-column panel
    const uint64_t da = wgmma_desc(a_rows + (kk / 4) * kBN * 128 + col, 16, 1024);
    const uint64_t db = wgmma_desc(b_tile + (kk / 4) * kBM * 128 + col, 16, 1024);
    wgmma_m64n64k16_ss<kBf16, false>(reinterpret_cast<float(&)[32]>(x), da, db, kk > 0);
  }
  wgmma_commit();
}

// acc += A B for one consumer: A (64 keys x 64 queries, P^T or dS^T) from registers, B (the
// step's 64 x D tile, dO or Q) MN-major, no commit.
template <bool kBf16, int D>
__device__ __forceinline__ void issue_keys_x_d(float (&acc)[D / 8][4], uint32_t (&a)[kBM / 16][4],
                                               uint32_t b_tile) {
#pragma unroll
  for (int kk = 0; kk < kBM / 16; ++kk) {
    const uint64_t db = wgmma_desc(b_tile + kk * 16 * 128, kBM * 128, 1024);
    if constexpr (D == 128) {
      wgmma_m64n128k16_rs<kBf16>(reinterpret_cast<float(&)[64]>(acc), a[kk], db, 1);
    } else {
      wgmma_m64n64k16_rs<kBf16>(reinterpret_cast<float(&)[32]>(acc), a[kk], db, 1);
    }
  }
}

// dQ share = dS K over the keys [key0, key0 + kKeys) and the 64 columns starting at panel
// `panel` of K: dS^T (rows = keys, the queries contiguous) and K (rows = keys) are both
// MN-major operands.
template <bool kBf16, int kKeys>
__device__ __forceinline__ void issue_dq(float (&dq)[8][4], uint32_t ds_tile, uint32_t k_tile,
                                         int key0, int panel) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    const uint32_t row = (key0 + kk * 16) * 128;
    const uint64_t da = wgmma_desc(ds_tile + row, kBN * 128, 1024);
    const uint64_t db = wgmma_desc(k_tile + panel * kBN * 128 + row, kBN * 128, 1024);
    wgmma_m64n64k16_ss<kBf16, true>(reinterpret_cast<float(&)[32]>(dq), da, db, kk > 0);
  }
}

template <bool kBf16, int D, bool kDeterministic>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_wgmma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                     const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
                     const BwdKernelParams p) {
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sK = base + L::kK, sV = base + L::kV, sQ = base + L::kQ, sDO = base + L::kDO;
  const uint32_t sDS = base + L::kDS;
  float* lse_s = reinterpret_cast<float*>(smem + L::kLse);
  float* delta_s = reinterpret_cast<float*>(smem + L::kDelta);
  const uint32_t bar_kv = base + L::kBars, full = bar_kv + 8, empty = bar_kv + 24;  // [2] each
  Step* dq_next_turn = reinterpret_cast<Step*>(smem + L::kNextTurn);

  const int tid = threadIdx.x, wg = tid / 128;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int key_tile = kDeterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int c0 = key_tile * kBN;
  const TileRange qt = query_tiles(p.mask, c0, kBN, kBM);

  if (tid == 0) {
    if constexpr (kDeterministic) *dq_next_turn = {0, qt.first};
    mbar_init(bar_kv, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(full + 8 * s, 128);   // every producer thread: its statistic stored
      mbar_init(empty + 8 * s, 256);  // every consumer thread: done with the stage
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    Step st = next_step(p, b, kvh, c0, qt, 0, qt.first);
    if (tid == 0 && st.hh < p.group) {
      mbar_arrive_expect_tx(bar_kv, 2 * L::kKVBytes);
      tma_load_tile<kBN, D>(sK, &tm_k, bar_kv, c0, kvh, b);
      tma_load_tile<kBN, D>(sV, &tm_v, bar_kv, c0, kvh, b);
    }
    for (int it = 0; st.hh < p.group; ++it) {
      const int stage = it & 1;
      if (it >= 2) mbar_wait(empty + 8 * stage, ((it >> 1) - 1) & 1);
      const float stat = row_stat(p, b, kvh, st, tid);
      if (tid < kBM) lse_s[stage * kBM + tid] = stat;
      else delta_s[stage * kBM + tid - kBM] = stat;
      const uint32_t bar = full + 8 * stage;
      if (tid == 0) {  // its arrival (release) also publishes its statistic
        const int h = kvh * p.group + st.hh;
        mbar_arrive_expect_tx(bar, 2 * L::kQBytes);
        tma_load_tile<kBM, D>(sQ + stage * L::kQBytes, &tm_q, bar, st.m * kBM, h, b);
        tma_load_tile<kBM, D>(sDO + stage * L::kQBytes, &tm_do, bar, st.m * kBM, h, b);
      } else {
        mbar_arrive(bar);
      }
      st = next_step(p, b, kvh, c0, qt, st.hh, st.m + 1);
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1, tid_c = tid % 128, warp_c = tid_c / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int row_a = warp_c * 16 + g;  // this thread's rows of a 64-row accumulator: row_a, +8
  const int key_a = c0 + 64 * c + row_a;
  const uint32_t k_rows = sK + 64 * c * 128, v_rows = sV + 64 * c * 128;  // this consumer's keys
  // The dQ share: D = 128, all keys x panel c of D; D = 64, this consumer's keys x all of D.
  constexpr int kDqKeys = D == 128 ? kBN : 64;
  const int dq_key0 = D == 128 ? 0 : 64 * c, dq_panel = D == 128 ? c : 0;
  const Interval key_queries[2] = {key_rows(p.mask, key_a), key_rows(p.mask, key_a + 8)};
  const DqTurns turns{&p, b, kvh, key_tile, qt, dq_next_turn};
  const bool turn_taker = c == 0 && tid_c == 0;

  // Adds step `done`'s dQ share to the workspace.
  auto add_dq_share = [&](const float (&dq)[8][4], Step done) {
    const int h = kvh * p.group + done.hh, q0 = done.m * kBM;
    if constexpr (kDeterministic) {
      // Both consumers add after the previous key tiles; with D = 64 (both add to every
      // column) consumer 0 before consumer 1.
      if (turn_taker) turns.take_turn(done);
      named_bar_sync(kBarDqTurn, 256);
      if (D == 64 && c == 1) named_bar_sync(kBarDqTurn, 256);
      add_dq<D>(p, dq, b, h, q0, row_a, 64 * dq_panel, t4);
      __threadfence();
      if (D == 64 && c == 0) named_bar_sync(kBarDqTurn, 256);
      named_bar_sync(kBarDqTurn, 256);
      if (turn_taker) turns.pass(done);
    } else {
      add_dq<D>(p, dq, b, h, q0, row_a, 64 * dq_panel, t4);
    }
  };

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  Step cur = next_step(p, b, kvh, c0, qt, 0, qt.first);
  if (cur.hh < p.group) mbar_wait(bar_kv, 0);
  for (int it = 0; cur.hh < p.group; ++it) {
    const int stage = it & 1;
    mbar_wait(full + 8 * stage, (it >> 1) & 1);
    const uint32_t q_s = sQ + stage * L::kQBytes, do_s = sDO + stage * L::kQBytes;
    const uint32_t ds_s = sDS + stage * L::kDsBytes;
    const int q0 = cur.m * kBM;
    const uint8_t* mask = p.mask.mask_for(b, kvh * p.group + cur.hh);
    const bool partial = tile_status(p.mask, mask, q0, kBM, c0, kBN) == kTilePartial;

    float st[kBM / 8][4], dpt[kBM / 8][4];
    issue_keys_x_queries<kBf16, D>(st, k_rows, q_s);
    issue_keys_x_queries<kBf16, D>(dpt, v_rows, do_s);
    wgmma_wait<1>();
    fence_regs(reinterpret_cast<float(&)[32]>(st));
    probabilities(st, p, lse_s + stage * kBM, partial, mask, q0, key_a, t4, key_queries);
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[32]>(dpt));
    dscores(st, dpt, delta_s + stage * kBM, t4);

    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
    pack_p_ds<kBf16>(st, dpt, pa, da, ds_s, 64 * c + row_a, t4);
    fence_proxy_async();  // the dQ wgmmas read these rows

    wgmma_fence();
    issue_keys_x_d<kBf16, D>(dv, pa, do_s);
    issue_keys_x_d<kBf16, D>(dk, da, q_s);
    wgmma_commit();

    named_bar_sync(kBarDs, 256);
    float dq[8][4];
    wgmma_fence();
    issue_dq<kBf16, kDqKeys>(dq, ds_s, sK, dq_key0, dq_panel);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[D / 2]>(dv));
    fence_regs(reinterpret_cast<float(&)[D / 2]>(dk));
    fence_regs(reinterpret_cast<float(&)[32]>(dq));
    fence_regs(reinterpret_cast<uint32_t(&)[kBM / 4]>(pa));
    fence_regs(reinterpret_cast<uint32_t(&)[kBM / 4]>(da));
    mbar_arrive(empty + 8 * stage);  // Q, dO and the statistics of the stage are read
    add_dq_share(dq, cur);
    cur = next_step(p, b, kvh, c0, qt, cur.hh, cur.m + 1);
  }
  if constexpr (kDeterministic) {
    if (turn_taker && qt.first < qt.end) turns.pass_before({p.group, qt.first});
  }

  store_dk_dv<kBf16, D>(p, dk, dv, b, kvh, key_a, t4);
}

template <bool kBf16, int D>
cudaError_t Launch(const BwdLaunch& l, cudaStream_t stream) {
  return LaunchBwdKernel(bwd_wgmma_kernel<kBf16, D, false>, bwd_wgmma_kernel<kBf16, D, true>,
                         kThreads, Smem<D>::kBytes, l, stream);
}

}  // namespace

cudaError_t LaunchBwdWgmma(const BwdLaunch& l, cudaStream_t stream) {
  if (l.D == 64) return l.bf16 ? Launch<true, 64>(l, stream) : Launch<false, 64>(l, stream);
  return l.bf16 ? Launch<true, 128>(l, stream) : Launch<false, 128>(l, stream);
}

}  // namespace jax_sparsek::cuda
