// Hopper forward (FlashAttention-3 style). One CTA computes a 128-row query tile with three
// warpgroups:
//   producer (warpgroup 0, 24 registers): one thread streams Q once and K/V tiles of 128 keys
//     through a two-stage TMA pipeline (full/empty mbarriers per stage);
//   two consumers (warpgroups 1-2, 240 registers), 64 query rows each: S = Q K^T with wgmma
//     (both operands in shared memory), online softmax in registers, O += P V with P taken
//     straight from registers.
// Overlap: each consumer issues S_i = Q K_i^T and O += P_{i-1} V_{i-1} back to back, then runs
// the softmax of S_i while P_{i-1} V_{i-1} is still in flight; with ping-pong on, the two
// consumers also take turns issuing their GEMMs (named barriers), so one warpgroup's softmax
// runs under the other's GEMMs. The epilogue stages O in the consumer's own Q rows and
// writes it with a TMA store.
#include "attention_kernels.h"
#include "fwd_common.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kThreads = 384;
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
// Named barrier ids: 1 + c = consumer c's turn to issue GEMMs; 3 + c = consumer c's epilogue.
constexpr int kBarTurn = 1, kBarEpilogue = 3;

template <int D>
struct Smem {
  static constexpr uint32_t kQBytes = kBM * D * 2, kTileBytes = kBN * D * 2;
  static constexpr uint32_t kQ = 0, kK = kQ + kQBytes, kV = kK + 2 * kTileBytes;
  static constexpr uint32_t kBars = kV + 2 * kTileBytes;  // 9 mbarriers
  static constexpr uint32_t kTileInfo = kBars + 9 * 8;     // int[2]: the key tile in each stage
  static constexpr int kBytes = 1024 + kTileInfo + 2 * 4;
};

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// S = Q K^T for one consumer: 64 rows of Q (q_rows: this consumer's rows in panel 0) times
// the 128-key tile, D/16 wgmmas, one commit group.
template <bool kBf16, int D>
__device__ __forceinline__ void issue_qk(float (&s)[kBN / 8][4], uint32_t q_rows, uint32_t k_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = (kk / 4) * kBN * 128 + (kk % 4) * 32;  // panel, 16-column step
    const uint64_t da = wgmma_desc(q_rows + (kk / 4) * kBM * 128 + (kk % 4) * 32, 16, 1024);
    const uint64_t db = wgmma_desc(k_tile + koff, 16, 1024);
    wgmma_m64n128k16_ss<kBf16>(reinterpret_cast<float(&)[kBN / 2]>(s), da, db, kk > 0);
  }
  wgmma_commit();
}

// O += P V: P (64 x 128, registers) times the 128 x D value tile (MN-major: one key per
// 128-byte row, D/64 panels kBN * 128 bytes apart).
template <bool kBf16, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], uint32_t (&pf)[kBN / 16][4],
                                         uint32_t v_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const uint64_t db = wgmma_desc(v_tile + kk * 16 * 128, kBN * 128, 1024);
    if constexpr (D == 128) {
      wgmma_m64n128k16_rs<kBf16>(reinterpret_cast<float(&)[64]>(o), pf[kk], db, 1);
    } else {
      wgmma_m64n64k16_rs<kBf16>(reinterpret_cast<float(&)[32]>(o), pf[kk], db, 1);
    }
  }
  wgmma_commit();
}

// Accumulator-layout probabilities -> A-operand fragments (16 keys per wgmma k-step).
template <bool kBf16>
__device__ __forceinline__ void convert_p(const float (&s)[kBN / 8][4], uint32_t (&pf)[kBN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) pack_a<kBf16>(pf[kk], s, kk);
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_wgmma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                     const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_o,
                     const FwdKernelParams p, const int pingpong) {
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = base + L::kQ, sK = base + L::kK, sV = base + L::kV;
  const uint32_t bars = base + L::kBars;
  const uint32_t bar_q = bars, k_full = bars + 8, k_empty = bars + 24, v_full = bars + 40,
                 v_empty = bars + 56;  // [2] each, 8 bytes apart
  volatile int* tile_info = reinterpret_cast<volatile int*>(smem_raw + (base - smem_u32(smem_raw)) + L::kTileInfo);

  const int tid = threadIdx.x, wg = tid / 128;
  const int m_tile = p.mask.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
  const int r0 = m_tile * kBM;
  const uint8_t* mask = p.mask.mask_for(b, h);
  const TileRange range = key_tiles(p.mask, r0, kBM, kBN);

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(k_full + 8 * s, 1);
      mbar_init(v_full + 8 * s, 1);
      mbar_init(k_empty + 8 * s, 256);
      mbar_init(v_empty + 8 * s, 256);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (tid != 0) return;
    int n = next_key_tile(p.mask, mask, r0, kBM, kBN, range.first, range.end);
    if (n >= range.end) return;  // the consumers find no tile either
    mbar_arrive_expect_tx(bar_q, L::kQBytes);
    tma_load_tile<kBM, D>(sQ, &tm_q, bar_q, r0, h, b);
    // Each stage also carries its tile's index and status (2 n + partial) in shared memory,
    // published by the arrive on k_full; -1 after the last tile ends the consumers' loop.
    for (int it = 0;; ++it) {
      const int stage = it & 1;
      const uint32_t use = it >> 1;
      if (it >= 2) mbar_wait(k_empty + 8 * stage, (use - 1) & 1);
      if (n >= range.end) {
        tile_info[stage] = -1;
        mbar_arrive(k_full + 8 * stage);
        break;
      }
      tile_info[stage] = 2 * n + (tile_status(p.mask, mask, r0, kBM, n * kBN, kBN) == kTilePartial);
      mbar_arrive_expect_tx(k_full + 8 * stage, L::kTileBytes);
      tma_load_tile<kBN, D>(sK + stage * L::kTileBytes, &tm_k, k_full + 8 * stage, n * kBN, kvh, b);
      if (it >= 2) mbar_wait(v_empty + 8 * stage, (use - 1) & 1);
      mbar_arrive_expect_tx(v_full + 8 * stage, L::kTileBytes);
      tma_load_tile<kBN, D>(sV + stage * L::kTileBytes, &tm_v, v_full + 8 * stage, n * kBN, kvh, b);
      n = next_key_tile(p.mask, mask, r0, kBM, kBN, n + 1, range.end);
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1;  // consumer index: query rows [64 c, 64 c + 64) of the tile
  const int tid_c = tid % 128, warp_c = tid_c / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int row_a = r0 + c * 64 + warp_c * 16 + g;  // this thread's rows: row_a, row_a + 8
  const uint32_t q_rows = sQ + c * 64 * 128;

  float o[D / 8][4] = {};
  float s[kBN / 8][4];
  uint32_t pf[kBN / 16][4];
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
  const int my_turn = kBarTurn + c, other_turn = kBarTurn + (1 - c);

  if (next_key_tile(p.mask, mask, r0, kBM, kBN, range.first, range.end) < range.end) {
    const RowMasks row_masks(p.mask, mask, row_a);
    if (pingpong && c == 1) named_bar_arrive(kBarTurn, 256);  // consumer 0 goes first
    mbar_wait(bar_q, 0);

    // Tile 0: S_0 only.
    mbar_wait(k_full, 0);
    int tile = tile_info[0];  // 2 n + partial
    if (pingpong) named_bar_sync(my_turn, 256);
    issue_qk<kBf16, D>(s, q_rows, sK);
    if (pingpong) named_bar_arrive(other_turn, 256);
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[kBN / 2]>(s));
    mbar_arrive(k_empty);
    softmax_update<kBN / 8>(s, m_run, l_run, alpha, p.scale_log2, tile & 1, row_masks,
                            (tile >> 1) * kBN + 2 * t4);
    convert_p<kBf16>(s, pf);

    int it = 1;
    for (;; ++it) {
      const int stage = it & 1, prev = stage ^ 1;
      mbar_wait(k_full + 8 * stage, (it >> 1) & 1);
      tile = tile_info[stage];
      if (tile < 0) break;  // no more key tiles
      if (pingpong) named_bar_sync(my_turn, 256);
      issue_qk<kBf16, D>(s, q_rows, sK + stage * L::kTileBytes);
      rescale_rows<D>(o, alpha);
      mbar_wait(v_full + 8 * prev, ((it - 1) >> 1) & 1);
      issue_pv<kBf16, D>(o, pf, sV + prev * L::kTileBytes);
      if (pingpong) named_bar_arrive(other_turn, 256);

      wgmma_wait<1>();  // S_i is done; P_{i-1} V_{i-1} may still run
      fence_regs(reinterpret_cast<float(&)[kBN / 2]>(s));
      mbar_arrive(k_empty + 8 * stage);
      softmax_update<kBN / 8>(s, m_run, l_run, alpha, p.scale_log2, tile & 1, row_masks,
                              (tile >> 1) * kBN + 2 * t4);
      wgmma_wait<0>();
      fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
      fence_regs(reinterpret_cast<uint32_t(&)[kBN / 4]>(pf));
      mbar_arrive(v_empty + 8 * prev);
      convert_p<kBf16>(s, pf);
    }

    // Last P V.
    const int last = (it - 1) & 1;
    if (pingpong) named_bar_sync(my_turn, 256);
    rescale_rows<D>(o, alpha);
    mbar_wait(v_full + 8 * last, ((it - 1) >> 1) & 1);
    issue_pv<kBf16, D>(o, pf, sV + last * L::kTileBytes);
    if (pingpong && c == 0) named_bar_arrive(other_turn, 256);  // consumer 1 issues last
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
    fence_regs(reinterpret_cast<uint32_t(&)[kBN / 4]>(pf));
    mbar_arrive(v_empty + 8 * last);
  }

  // ---------------- epilogue ----------------
  float inv[2], lse[2];
  finalize_rows(m_run, l_run, inv, lse);
  // Stage O (16-bit) in this consumer's own Q rows, in the swizzled tile format, then TMA-store.
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = c * 64 + warp_c * 16 + g + 8 * ri;
      const uint32_t addr = tile_addr(sQ, kBM, r, 8 * j) + 4 * t4;
      const uint32_t val = pack2<kBf16>(o[j][2 * ri] * inv[ri], o[j][2 * ri + 1] * inv[ri]);
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(val) : "memory");
    }
  }
  fence_proxy_async();
  named_bar_sync(kBarEpilogue + c, 128);
  if (tid_c == 0) {
#pragma unroll
    for (int pnl = 0; pnl < D / 64; ++pnl) {
      tma_store_4d(&tm_o, q_rows + pnl * kBM * 128, pnl * 64, r0 + c * 64, h, b);
    }
    tma_store_commit_and_wait();
  }
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = row_a + 8 * ri;
    if (t4 == 0 && row < p.mask.T) p.lse[(int64_t(b) * p.N + h) * p.mask.T + row] = lse[ri];
  }
}

template <bool kBf16, int D>
cudaError_t Launch(const FwdArgs& a, bool pingpong, cudaStream_t stream, std::string* error) {
  CUtensorMap tq, tk, tv, to;
  const AttentionDims& d = a.dims;
  if (!MakeTensorMap(&tq, a.q, kBf16, d.B, d.T, d.N, D, error) ||
      !MakeTensorMap(&tk, a.k, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&tv, a.v, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&to, a.o, kBf16, d.B, d.T, d.N, D, error)) {
    return cudaErrorInvalidValue;
  }
  auto kernel = fwd_wgmma_kernel<kBf16, D>;
  constexpr int smem = Smem<D>::kBytes;
  cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((d.T + kBM - 1) / kBM, d.N, d.B);
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, to, MakeFwdKernelParams(a), pingpong ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchFwdWgmma(const FwdArgs& a, bool pingpong, cudaStream_t stream, std::string* error) {
  if (a.dims.D == 64) {
    return a.bf16 ? Launch<true, 64>(a, pingpong, stream, error)
                  : Launch<false, 64>(a, pingpong, stream, error);
  }
  return a.bf16 ? Launch<true, 128>(a, pingpong, stream, error)
                : Launch<false, 128>(a, pingpong, stream, error);
}

}  // namespace jax_sparsek::cuda
