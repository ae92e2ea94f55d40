// SparseK forward on Hopper, in two launches on one stream:
//   1. the window part: the flash forward kernel (wgmma) with the SparseK window as its mask,
//      writing o and lse of the window keys alone;
//   2. fwd_gather_kernel: one CTA per (query tile, query head, batch), 4 warps of 16 rows
//      (mma.sync m16n8k16, as fwd_mma.cu). It walks its tile's key list (select.cu) in chunks of
//      64 keys, gathers their K and V rows with cp.async into the swizzled tile format (the next
//      chunk's gather overlaps this chunk's math), masks the keys a query does not select (one
//      rank compare), weighs the online softmax's terms by the gates, and merges the
//      result with the window part's (o, lse) of its rows: two softmaxes over disjoint key sets
//      combine by their log-sum-exps.
#include <algorithm>

#include "flash_attention/cuda/attention_kernels.h"
#include "flash_attention/cuda/fwd_common.cuh"
#include "flash_attention/cuda/ptx.cuh"
#include "sparsek/cuda/gates.cuh"
#include "sparsek/cuda/gather.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {
namespace {

constexpr int kBM = kTileQueries, kBN = kGatherRows, kThreads = kGatherThreads;

struct GatherFwdParams {
  SparsekDims dims;
  float scale_log2;
  bool merge_window;  // the window part wrote (o, lse) first
  const void *q, *k, *v;
  const float *scores, *tau;
  const int32_t *kth, *tile_keys, *tile_count, *key_rank;
  void* o;
  float* lse;
};

template <int D>
struct Smem {
  static constexpr uint32_t kTileBytes = kBN * D * 2;
  static constexpr uint32_t kQ = 0, kK = kQ + kBM * D * 2, kV = kK + 2 * kTileBytes;  // K[2], V[2]
  static constexpr uint32_t kKeys = kV + 2 * kTileBytes;  // int32 [2][kBN]: key index, -1 = padding
  static constexpr uint32_t kScores = kKeys + 2 * kBN * 4;  // fp32 [2][kBN]: u of each key
  static constexpr uint32_t kRanks = kScores + 2 * kBN * 4;  // int32 [2][kBN]: rank of each key
  static constexpr int kBytes = 1024 + kRanks + 2 * kBN * 4;
};

template <bool kBf16, int D>
__global__ void __launch_bounds__(kThreads) fwd_gather_kernel(const GatherFwdParams p) {
  using Elem = typename Elem16<kBf16>::type;
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  const uint32_t base = smem_u32(smem);
  const uint32_t sQ = base + L::kQ, sK = base + L::kK, sV = base + L::kV;
  int32_t* keys_s = reinterpret_cast<int32_t*>(smem + L::kKeys);
  float* u_s = reinterpret_cast<float*>(smem + L::kScores);
  int32_t* rank_s = reinterpret_cast<int32_t*>(smem + L::kRanks);

  const SparsekDims& d = p.dims;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int tile = blockIdx.x, n = blockIdx.y, b = blockIdx.z, h = n / d.group();
  const int r0 = tile * kBM;
  const TileKeyList list(d, p.tile_keys, p.tile_count, p.key_rank, p.scores, b, h, tile);
  if (list.count == 0 && p.merge_window) return;  // the window part is the whole answer
  const int64_t bh = list.bh;
  const float* u_row = list.u;
  const Elem* q_base = static_cast<const Elem*>(p.q);
  constexpr int kChunksPerRow = D / 8;  // 16-byte pieces of one row

  // Q tile (rows past T zero-filled), then chunks 0 and 1 of the list, one commit group each.
  for (int c = tid; c < kBM * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8, i = r0 + r;
    const bool valid = i < d.T;
    cp_async_16(tile_addr(sQ, kBM, r, col),
                q_base + ((int64_t(b) * d.T + (valid ? i : 0)) * d.N + n) * D + col, valid);
  }
  const int num_chunks = (list.count + kBN - 1) / kBN;
  auto gather_chunk = [&](int stage, int chunk) {
    list.Gather<D>(d, b, h, chunk, static_cast<const uint16_t*>(p.k),
                   static_cast<const uint16_t*>(p.v), sK + stage * L::kTileBytes,
                   sV + stage * L::kTileBytes, keys_s + stage * kBN, u_s + stage * kBN,
                   rank_s + stage * kBN);
  };
  gather_chunk(0, 0);
  gather_chunk(1, 1);

  // This thread's rows row_a and row_a + 8, and their selections.
  const int row_a = r0 + warp * 16 + g;
  const float* tau_row = p.tau + bh * d.T;
  const int32_t* kth_row = p.kth + bh * d.T;
  QuerySelection sel[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_a + 8 * ri;
    if (i < d.T) {
      sel[ri] = QuerySelection::Load(i, d.T, d.S, d.window, d.causal, u_row, d.K, tau_row, kth_row,
                                     list.rank);
    } else {
      sel[ri] = QuerySelection::None();
    }
  }

  float o_acc[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int stage = chunk & 1;
    cp_async_wait<1>();
    __syncthreads();  // this chunk's rows, keys and scores are visible to every warp
    const uint32_t k_s = sK + stage * L::kTileBytes, v_s = sV + stage * L::kTileBytes;

    // S = Q K^T for this warp's 16 rows x 64 gathered keys. The Q fragments are reloaded from
    // shared memory per chunk rather than held: their 32 registers go to the gates.
    float s[kBN / 8][4] = {};
    {
      uint32_t qf[D / 16][4];
      load_q_fragments<D, kBM>(qf, sQ, warp, lane);
      add_qk<kBf16, D, kBN>(s, qf, k_s, lane);
    }

    // Log2-domain scores, -inf where the gate is 0; the softmax weighs key j by g_ij exp(s_ij).
    float gate[kBN / 8][4];
#pragma unroll
    for (int jn = 0; jn < kBN / 8; ++jn) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = stage * kBN + jn * 8 + 2 * t4 + e;
        const int j = keys_s[col], rank_j = rank_s[col];
        const float uj = u_s[col];
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const bool selected = j >= 0 && sel[ri].SelectsByRank(j, rank_j);
          float& g_ij = gate[jn][2 * ri + e];
          g_ij = sel[ri].Gate(selected, j, uj, d.causal, d.window);
          float& x = s[jn][2 * ri + e];
          x = g_ij > 0.f ? x * p.scale_log2 : -INFINITY;
        }
      }
    }
    float alpha[2];
    softmax_update_log2<kBN / 8>(s, m_run, l_run, alpha, gate);
    rescale_and_add_pv<kBf16, D, kBN>(o_acc, s, alpha, v_s, lane);

    __syncthreads();  // every warp is done with this stage: refill it
    gather_chunk(stage, chunk + 2);
  }
  cp_async_wait<0>();

  // Epilogue: normalize, merge with the window part, store o and the natural-log lse.
  float inv[2], lse_sel[2];
  finalize_rows(m_run, l_run, inv, lse_sel);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = row_a + 8 * ri;
    if (i >= d.T) continue;
    Elem* orow = static_cast<Elem*>(p.o) + ((int64_t(b) * d.T + i) * d.N + n) * D;
    float* lse_out = p.lse + (int64_t(b) * d.N + n) * d.T + i;
    // Weights of the two parts: w_sel multiplies the normalized gathered output, w_win the
    // window part's; both 0 when the row sees no key at all.
    float w_sel = inv[ri] > 0.f ? 1.f : 0.f, w_win = 0.f, lse = lse_sel[ri];
    if (p.merge_window) {
      const float lse_win = *lse_out;
      const float m = fmaxf(lse_win, lse_sel[ri]);
      if (m != -INFINITY) {
        w_win = __expf(lse_win - m);
        w_sel = __expf(lse_sel[ri] - m);
        const float total = w_win + w_sel;
        w_win /= total;
        w_sel /= total;
        lse = m + __logf(total);
      }
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(orow + nb * 8 + 2 * t4);
      float x = o_acc[nb][2 * ri] * inv[ri] * w_sel, y = o_acc[nb][2 * ri + 1] * inv[ri] * w_sel;
      if (w_win > 0.f) {
        const float2 win = unpack2<kBf16>(*dst);
        x += w_win * win.x;
        y += w_win * win.y;
      }
      *dst = pack2<kBf16>(x, y);
    }
    if (t4 == 0) *lse_out = lse;
  }
}

template <bool kBf16, int D>
cudaError_t LaunchGather(const GatherFwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_gather_kernel<kBf16, D>;
  constexpr int smem = Smem<D>::kBytes;
  cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.dims.num_tiles(), p.dims.N, p.dims.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSparsekForward(const ForwardArgs& a, cudaStream_t stream, std::string* error) {
  const SparsekDims& d = a.dims;
  if (int64_t(d.B) * d.T * d.N == 0) return cudaSuccess;
  const bool with_window = d.window > 0 && d.S > 0;
  if (with_window) {
    cudaError_t err =
        LaunchFlashForward(WindowPartArgs<FwdArgs>(a), FwdKernel::kWgmma, stream, error);
    if (err != cudaSuccess) return err;
  }
  const GatherFwdParams p{d, a.scale * kLog2e, with_window, a.q, a.k, a.v,
                          a.scores, a.tau, a.kth, a.tile_keys, a.tile_count, a.key_rank,
                          a.o, a.lse};
  if (d.D == 64) return a.bf16 ? LaunchGather<true, 64>(p, stream) : LaunchGather<false, 64>(p, stream);
  return a.bf16 ? LaunchGather<true, 128>(p, stream) : LaunchGather<false, 128>(p, stream);
}

}  // namespace jax_sparsek::cuda::sparsek
