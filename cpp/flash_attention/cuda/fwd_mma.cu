// Portable warp-level forward (FlashAttention-2 style, mma.sync m16n8k16): 4 warps, each
// owning 16 query rows of a 64-row tile, stream 64-key tiles of K and V through a two-stage
// TMA pipeline with an online softmax. Kept as the reference point the Hopper kernel
// (fwd_wgmma.cu) is measured against; selected with JAX_SPARSEK_CUDA_FWD_KERNEL=mma.
#include "attention_kernels.h"
#include "fwd_common.cuh"
#include "ptx.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kThreads = 128;

// This warp's 16 rows of the Q tile at q_s (tile format) as A fragments for add_qk.
template <int D>
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
template <bool kBf16, int D>
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

// O = alpha * O + P V for this warp's 16 rows: P (16 x kBN probabilities in the accumulator
// layout, converted to 16-bit A fragments) times the kBN x D value tile at v_s (tile format).
template <bool kBf16, int D>
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

template <int D>
constexpr int SmemBytes() {
  return 1024 + kBM * D * 2 + 4 * kBN * D * 2 + 64;  // align slack, Q, K[2], V[2], barriers
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kThreads) fwd_mma_kernel(const __grid_constant__ CUtensorMap tm_q,
                                                            const __grid_constant__ CUtensorMap tm_k,
                                                            const __grid_constant__ CUtensorMap tm_v,
                                                            const FwdKernelParams p) {
  using Elem = typename Elem16<kBf16>::type;
  constexpr uint32_t kQBytes = kBM * D * 2, kTileBytes = kBN * D * 2;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = base, sK = sQ + kQBytes, sV = sK + 2 * kTileBytes;
  const uint32_t bar_q = sV + 2 * kTileBytes, bar_kv = bar_q + 8;  // bar_kv[2]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int m_tile = p.mask.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
  const int r0 = m_tile * kBM;
  const uint8_t* mask = p.mask.mask_for(b, h);
  const TileRange range = key_tiles(p.mask, r0, kBM, kBN);

  if (tid == 0) {
    mbar_init(bar_q, 1);
    mbar_init(bar_kv, 1);
    mbar_init(bar_kv + 8, 1);
    fence_barrier_init();
  }
  __syncthreads();

  auto load_kv = [&](int stage, int n) {
    const uint32_t bar = bar_kv + 8 * stage;
    mbar_arrive_expect_tx(bar, 2 * kTileBytes);
    tma_load_tile<kBN, D>(sK + stage * kTileBytes, &tm_k, bar, n * kBN, kvh, b);
    tma_load_tile<kBN, D>(sV + stage * kTileBytes, &tm_v, bar, n * kBN, kvh, b);
  };
  auto next_tile = [&](int from) {
    return next_key_tile(p.mask, mask, r0, kBM, kBN, from, range.end);
  };

  int n_cur = next_tile(range.first);
  int n_next = n_cur < range.end ? next_tile(n_cur + 1) : range.end;
  if (tid == 0 && n_cur < range.end) {
    mbar_arrive_expect_tx(bar_q, kQBytes);
    tma_load_tile<kBM, D>(sQ, &tm_q, bar_q, r0, h, b);
    load_kv(0, n_cur);
    if (n_next < range.end) load_kv(1, n_next);
  }

  float o_acc[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int row_a = r0 + warp * 16 + g;  // this thread's rows: row_a and row_a + 8
  const RowMasks row_masks(p.mask, mask, row_a);
  uint32_t qf[D / 16][4];
  if (n_cur < range.end) {
    mbar_wait(bar_q, 0);
    load_q_fragments<D>(qf, sQ, warp, lane);
  }

  for (int it = 0; n_cur < range.end; ++it) {
    const int stage = it & 1;
    mbar_wait(bar_kv + 8 * stage, (it >> 1) & 1);
    const uint32_t k_s = sK + stage * kTileBytes, v_s = sV + stage * kTileBytes;

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kBN / 8][4] = {};
    add_qk<kBf16, D>(s, qf, k_s, lane);

    const int c0 = n_cur * kBN;
    const bool partial = tile_status(p.mask, mask, r0, kBM, c0, kBN) == kTilePartial;
    float alpha[2];
    softmax_update<kBN / 8>(s, m_run, l_run, alpha, p.scale_log2, partial, row_masks, c0 + 2 * t4);
    rescale_and_add_pv<kBf16, D>(o_acc, s, alpha, v_s, lane);

    __syncthreads();  // every warp is done with this stage: refill it
    const int n_after = n_next < range.end ? next_tile(n_next + 1) : range.end;
    if (tid == 0 && n_after < range.end) load_kv(stage, n_after);
    n_cur = n_next;
    n_next = n_after;
  }

  // Epilogue: normalize, store O (rows < T) and the natural-log LSE.
  float inv[2], lse[2];
  finalize_rows(m_run, l_run, inv, lse);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = row_a + 8 * ri;
    if (row >= p.mask.T) continue;
    Elem* orow = static_cast<Elem*>(p.o) + ((int64_t(b) * p.mask.T + row) * p.N + h) * D;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      *reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t4) =
          pack2<kBf16>(o_acc[nb][2 * ri] * inv[ri], o_acc[nb][2 * ri + 1] * inv[ri]);
    }
    if (t4 == 0) p.lse[(int64_t(b) * p.N + h) * p.mask.T + row] = lse[ri];
  }
}

template <bool kBf16, int D>
cudaError_t Launch(const FwdArgs& a, cudaStream_t stream, std::string* error) {
  CUtensorMap tq, tk, tv;
  const AttentionDims& d = a.dims;
  if (!MakeTensorMap(&tq, a.q, kBf16, d.B, d.T, d.N, D, error) ||
      !MakeTensorMap(&tk, a.k, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&tv, a.v, kBf16, d.B, d.S, d.K, D, error)) {
    return cudaErrorInvalidValue;
  }
  auto kernel = fwd_mma_kernel<kBf16, D>;
  constexpr int smem = SmemBytes<D>();
  cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((d.T + kBM - 1) / kBM, d.N, d.B);
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, MakeFwdKernelParams(a));
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchFwdMma(const FwdArgs& a, cudaStream_t stream, std::string* error) {
  if (a.dims.D == 64) return a.bf16 ? Launch<true, 64>(a, stream, error) : Launch<false, 64>(a, stream, error);
  return a.bf16 ? Launch<true, 128>(a, stream, error) : Launch<false, 128>(a, stream, error);
}

}  // namespace jax_sparsek::cuda
