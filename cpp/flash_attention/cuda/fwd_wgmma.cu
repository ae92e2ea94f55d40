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
#include "fwd_wgmma.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = kWgmmaRows, kBN = kWgmmaKeys, kThreads = kWgmmaThreads;

template <int D>
struct Smem {
  static constexpr uint32_t kQBytes = kBM * D * 2, kTileBytes = kBN * D * 2;
  static constexpr uint32_t kQ = 0, kK = kQ + kQBytes, kV = kK + 2 * kTileBytes;
  static constexpr uint32_t kBars = kV + 2 * kTileBytes;  // 9 mbarriers
  static constexpr uint32_t kTileInfo = kBars + 9 * 8;     // int[2]: the key tile in each stage
  static constexpr int kBytes = 1024 + kTileInfo + 2 * 4;
};

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
  const ConsumerThread ct(tid);
  const int c = ct.c, t4 = ct.t4;
  const int row_a = r0 + ct.row;  // this thread's rows: row_a, row_a + 8

  float o[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  if (next_key_tile(p.mask, mask, r0, kBM, kBN, range.first, range.end) < range.end) {
    const RowMasks row_masks(p.mask, mask, row_a);
    // Each stage's tile index and status come with its K (tile_info, published by the arrive
    // on k_full); -1 ends the loop.
    int tile = 0;  // 2 n + partial
    auto steps = mainloop_steps(
        [&](int it) {
          mbar_wait(k_full + 8 * (it & 1), (it >> 1) & 1);
          tile = tile_info[it & 1];
          return tile >= 0;
        },
        [&](int it, float(&s)[kBN / 8][4], float(&alpha)[2]) {
          mbar_arrive(k_empty + 8 * (it & 1));
          softmax_update<kBN / 8>(s, m_run, l_run, alpha, p.scale_log2, tile & 1, row_masks,
                                  (tile >> 1) * kBN + 2 * t4);
        },
        [&](int it) { mbar_wait(v_full + 8 * (it & 1), (it >> 1) & 1); },
        [&](int it) { mbar_arrive(v_empty + 8 * (it & 1)); });
    consumer_mainloop<kBf16, D>(o, steps, bar_q, ct.q_rows(sQ), sK, sV, L::kTileBytes, c, pingpong != 0);
  }

  // ---------------- epilogue ----------------
  store_o_tile<kBf16, D>(o, m_run, l_run, sQ, ct, &tm_o, r0, h, b, p.mask.T,
                         p.lse + (int64_t(b) * p.N + h) * p.mask.T);
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
