// SparseK forward on Hopper: one kernel, one CTA per (128-query tile, query head, batch), in
// the flash forward's design (fwd_wgmma.cu, pieces shared through fwd_wgmma.cuh): three
// warpgroups,
//   producer (warpgroup 0): loads Q once by TMA, then streams the tile's keys in chunks of 128
//     through two stages: first the window keys (contiguous rows [win_lo, win_hi]), then the
//     tile's key list (select.cu; at most k_select + 128 keys). Its 128 threads gather each
//     chunk's K and V rows by index with cp.async into the swizzled tile format and signal the
//     stage's mbarrier with cp.async.mbarrier.arrive: rows by index are what TMA cannot load.
//     For a listed chunk they then write each key's index, rank and score beside the rows,
//     behind a barrier of their own, which the consumers wait for only after Q K^T: those
//     scattered 4-byte loads do not hold up the GEMM;
//   two consumers (warpgroups 1-2), 64 query rows each, ping-pong: S = Q K^T and O += P V by
//     wgmma, one online softmax over both kinds of chunk. Window keys: the row's window
//     interval, gate 1. Listed keys: the query's selection (one rank compare) and gate
//     clip(u_j - tau_i, 0, 1), which weighs p after exp2;
//   epilogue: O through the Q tile's shared memory and a TMA store, lse per row.
// Causal windows and candidate sets are disjoint; non-causal queries skip listed keys inside
// their window (gates.cuh), so each key counts once.
#include <climits>

#include "flash_attention/cuda/attention_kernels.h"
#include "flash_attention/cuda/fwd_wgmma.cuh"
#include "sparsek/cuda/gates.cuh"
#include "sparsek/cuda/gather.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {
namespace {

constexpr int kBM = kWgmmaRows, kBN = kWgmmaKeys, kThreads = kWgmmaThreads;
static_assert(kBM == kTileQueries, "one CTA per key list");

struct FusedFwdParams {
  SparsekDims dims;
  MaskSpec window;   // WindowMask(dims); used only when has_window
  bool has_window;   // window > 0 and S > 0
  unsigned listed_window_keys;  // ListedWindowKeys(dims)
  float scale_log2;
  const uint16_t *k, *v;
  const float *scores, *tau;
  const int32_t *kth, *tile_keys, *tile_count, *key_rank;
  float* lse;
};

// What the softmax of a listed chunk needs of one of its keys, one 16-byte load: the key index
// (INT_MAX for padding, which no query selects), its rank and its score u_j.
struct alignas(16) ListedKey {
  int key, rank;
  float u;
};

template <int D>
struct Smem {
  static constexpr uint32_t kQBytes = kBM * D * 2, kTileBytes = kBN * D * 2;
  static constexpr uint32_t kQ = 0, kK = kQ + kQBytes, kV = kK + 2 * kTileBytes;  // K[2], V[2]
  static constexpr uint32_t kListed = kV + 2 * kTileBytes;   // ListedKey [2][kBN]
  static constexpr uint32_t kRows = kListed + 2 * kBN * sizeof(ListedKey);  // RowSelection [kBM]
  static constexpr uint32_t kBars = kRows + kBM * 16;         // 11 mbarriers
  static constexpr int kBytes = 1024 + kBars + 11 * 8;
};

// The chunks of one query tile, the same for the producer and both consumers: window chunk
// c < window_chunks holds keys window_lo + 128 c + [0, 128) (those <= window_hi), chunk
// window_chunks + l holds entries [128 l, 128 l + 128) of the key list.
struct ChunkPlan {
  int window_lo, window_hi, window_chunks, num_chunks;

  __device__ __forceinline__ ChunkPlan(const FusedFwdParams& p, int r0, int list_count) {
    window_lo = 0;
    window_hi = -1;
    if (p.has_window) {
      window_lo = p.window.key_lo(r0);
      window_hi = p.window.key_hi(min(r0 + kBM, p.dims.T) - 1);
    }
    window_chunks = window_hi >= window_lo ? (window_hi - window_lo) / kBN + 1 : 0;
    num_chunks = window_chunks + (list_count + kBN - 1) / kBN;
  }
};

// What the softmax of a listed chunk needs of one query row (QuerySelection's fields), kept in
// shared memory rather than in the consumers' registers, which the accumulators fill.
struct RowSelection {
  int num_candidates, min_rank;
  float tau;
  int position;
};

// Copies row r (0..31 of this warp's 32 rows of the chunk, key index j_r held by lane r) of a
// [B, S, K, D] tensor into row 32 * warp + r of the chunk tile at dst, for all 32 rows: D / 8
// lanes per row on consecutive 16-byte pieces; rows with j < 0 are zero-filled.
template <int D>
__device__ __forceinline__ void gather_warp_rows(uint32_t dst, const uint16_t* src, int j_mine,
                                                 int warp, int lane, int64_t row_base,
                                                 int64_t row_stride) {
  constexpr int kPieces = D / 8, kRowsPerPass = 32 / kPieces;
  const int piece = lane % kPieces, sub = lane / kPieces;
#pragma unroll 2
  for (int pass = 0; pass < 32 / kRowsPerPass; ++pass) {
    const int r = pass * kRowsPerPass + sub;
    const int j = __shfl_sync(0xffffffffu, j_mine, r);
    const uint16_t* at = src + row_base + int64_t(j >= 0 ? j : 0) * row_stride + piece * 8;
    cp_async_16(tile_addr(dst, kBN, 32 * warp + r, piece * 8), at, j >= 0);
  }
}

template <bool kBf16, int D>
__global__ void __launch_bounds__(kThreads, 1)
    fwd_gather_kernel(const __grid_constant__ CUtensorMap tm_q,
                      const __grid_constant__ CUtensorMap tm_o, const FusedFwdParams p) {
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  uint8_t* smem = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sQ = base + L::kQ, sK = base + L::kK, sV = base + L::kV;
  ListedKey* listed_s = reinterpret_cast<ListedKey*>(smem + L::kListed);
  RowSelection* rows_s = reinterpret_cast<RowSelection*>(smem + L::kRows);
  const uint32_t bars = base + L::kBars;
  const uint32_t bar_q = bars, k_full = bars + 8, k_empty = bars + 24, v_full = bars + 40,
                 v_empty = bars + 56, listed_full = bars + 72;  // [2] each, 8 bytes apart

  const SparsekDims& d = p.dims;
  const int tid = threadIdx.x, wg = tid / 128;
  const int tile = blockIdx.x, n = blockIdx.y, b = blockIdx.z, h = n / d.group();
  const int r0 = tile * kBM;
  const TileKeyList list(d, p.tile_keys, p.tile_count, p.key_rank, p.scores, b, h, tile);
  const ChunkPlan plan(p, r0, list.count);

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < 2; ++s) {
      mbar_init(k_full + 8 * s, 128);           // each producer thread: its copies landed
      mbar_init(listed_full + 8 * s, 2 * 128);  // the same, and its ListedKey store
      mbar_init(v_full + 8 * s, 128);           // each producer thread: its copies landed
      mbar_init(k_empty + 8 * s, 256);
      mbar_init(v_empty + 8 * s, 256);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (plan.num_chunks == 0) return;  // the consumers store zeros and lse = -inf
    if (tid == 0) {
      mbar_arrive_expect_tx(bar_q, L::kQBytes);
      tma_load_tile<kBM, D>(sQ, &tm_q, bar_q, r0, n, b);
    }
    const int warp = tid / 32, lane = tid % 32;
    const int64_t row_base = (int64_t(b) * d.S * d.K + h) * D, row_stride = int64_t(d.K) * D;
    for (int c = 0; c < plan.num_chunks; ++c) {
      const int stage = c & 1;
      const uint32_t use = c >> 1;
      const bool listed = c >= plan.window_chunks;
      // This thread's row of the chunk: its key index, -1 when there is none.
      int j;
      if (!listed) {
        j = plan.window_lo + c * kBN + tid;
        if (j > plan.window_hi) j = -1;
      } else {
        j = list.key((c - plan.window_chunks) * kBN + tid, d.S);
      }
      if (c >= 2) mbar_wait(k_empty + 8 * stage, (use - 1) & 1);
      gather_warp_rows<D>(sK + stage * L::kTileBytes, p.k, j, warp, lane, row_base, row_stride);
      cp_async_mbar_arrive(k_full + 8 * stage);
      if (listed) {
        // Listed chunk l's keys in ListedKey slots l & 1, free since listed chunk l - 2 (chunk
        // c - 2, whose K stage this thread just waited for) was released.
        const int l = c - plan.window_chunks;
        ListedKey* key = listed_s + (l & 1) * kBN + tid;
        key->key = j >= 0 ? j : INT_MAX;
        cp_async_4(smem_u32(&key->rank), list.rank + (j >= 0 ? j : 0), j >= 0);
        cp_async_4(smem_u32(&key->u), list.u + int64_t(j >= 0 ? j : 0) * d.K, j >= 0);
        cp_async_mbar_arrive(listed_full + 8 * (l & 1));
        mbar_arrive(listed_full + 8 * (l & 1));  // releases the key store
      }
      if (c >= 2) mbar_wait(v_empty + 8 * stage, (use - 1) & 1);
      gather_warp_rows<D>(sV + stage * L::kTileBytes, p.v, j, warp, lane, row_base, row_stride);
      cp_async_mbar_arrive(v_full + 8 * stage);
    }
    cp_async_wait_all();  // the copies carry no commit groups
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kConsumerRegs>();
  const ConsumerThread ct(tid);
  const int c = ct.c, t4 = ct.t4;
  const int row_a = r0 + ct.row;  // this thread's rows: row_a, row_a + 8

  float o[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  if (plan.num_chunks > 0) {
    // Per row: the selection (shared memory, one quad lane writes it for the quad's row).
    const float* tau_row = p.tau + list.bh * d.T;
    const int32_t* kth_row = p.kth + list.bh * d.T;
    if (t4 < 2) {
      const int i = row_a + 8 * t4;
      const QuerySelection q = i < d.T ? QuerySelection::Load(i, d.T, d.S, d.window, d.causal,
                                                              list.u, d.K, tau_row, kth_row, list.rank)
                                       : QuerySelection::None();
      rows_s[ct.row + 8 * t4] = {q.num_candidates, q.min_rank, q.tau, q.position};
    }
    __syncwarp();
    // Scores of chunk `it` -> masked log2-domain scores -> one online-softmax step; then the
    // stage's K (and a listed chunk's ListedKey slots) are free. Both kinds of chunk mask
    // without branches: the softmax runs under the other consumer's GEMMs only while it is
    // shorter than them.
    auto softmax_chunk = [&](int it, float(&s)[kBN / 8][4], float(&alpha)[2]) {
      const int stage = it & 1;
      if (it < plan.window_chunks) {
        // Key j = k0 + column.
        const int k0 = plan.window_lo + it * kBN;
        Interval window[2];
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) window[ri] = row_keys(p.window, row_a + 8 * ri);
#pragma unroll
        for (int jn = 0; jn < kBN / 8; ++jn) {
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const int j = k0 + jn * 8 + 2 * t4 + (v & 1);
            const Interval& w = window[v >> 1];
            float& x = s[jn][v];
            x = j >= w.lo && j <= w.hi ? x * p.scale_log2 : -INFINITY;
          }
        }
        softmax_update_log2<kBN / 8>(s, m_run, l_run, alpha);
        mbar_arrive(k_empty + 8 * stage);
        return;
      }
      const int l = it - plan.window_chunks;
      mbar_wait(listed_full + 8 * (l & 1), (l >> 1) & 1);
      const ListedKey* keys = listed_s + (l & 1) * kBN;
      QuerySelection sel[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const RowSelection r = rows_s[ct.row + 8 * ri];
        sel[ri] = {r.num_candidates, 0, 0.f, r.min_rank, r.tau, r.position};
      }
#pragma unroll
      for (int jn = 0; jn < kBN / 8; ++jn) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const ListedKey key = keys[jn * 8 + 2 * t4 + e];
#pragma unroll
          for (int ri = 0; ri < 2; ++ri) {
            const float gate =
                sel[ri].ListedGate(key.key, key.rank, key.u, d.window, p.listed_window_keys);
            float& x = s[jn][2 * ri + e];
            x = gate > 0.f ? x * p.scale_log2 : -INFINITY;
          }
        }
      }
      // The gate again after exp2 (the scores of unselected keys are 0 by then), its score
      // loaded again. The __syncwarp keeps the compiler from loading the 32 records early and
      // holding them through the max, which spilled.
      __syncwarp();
      softmax_update_log2<kBN / 8>(s, m_run, l_run, alpha, [&](int jn, int v) {
        return sel[v >> 1].SoftGate(keys[jn * 8 + 2 * t4 + (v & 1)].u);
      });
      mbar_arrive(k_empty + 8 * stage);
    };

    auto steps = mainloop_steps(
        [&](int it) {
          if (it >= plan.num_chunks) return false;
          mbar_wait(k_full + 8 * (it & 1), (it >> 1) & 1);
          fence_proxy_async();  // cp.async wrote the rows that wgmma reads
          return true;
        },
        softmax_chunk,
        [&](int it) {
          mbar_wait(v_full + 8 * (it & 1), (it >> 1) & 1);
          fence_proxy_async();
        },
        [&](int it) { mbar_arrive(v_empty + 8 * (it & 1)); });
    consumer_mainloop<kBf16, D>(o, steps, bar_q, ct.q_rows(sQ), sK, sV, L::kTileBytes, c,
                                /*pingpong=*/true);
  }

  // ---------------- epilogue ----------------
  store_o_tile<kBf16, D>(o, m_run, l_run, sQ, ct, &tm_o, r0, n, b, d.T,
                         p.lse + (int64_t(b) * d.N + n) * d.T);
}

template <bool kBf16, int D>
cudaError_t Launch(const ForwardArgs& a, const FusedFwdParams& p, cudaStream_t stream,
                   std::string* error) {
  const SparsekDims& d = a.dims;
  CUtensorMap tq, to;
  if (!MakeTensorMap(&tq, a.q, kBf16, d.B, d.T, d.N, D, error) ||
      !MakeTensorMap(&to, a.o, kBf16, d.B, d.T, d.N, D, error)) {
    return cudaErrorInvalidValue;
  }
  auto kernel = fwd_gather_kernel<kBf16, D>;
  constexpr int smem = Smem<D>::kBytes;
  cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(d.num_tiles(), d.N, d.B), kThreads, smem, stream>>>(tq, to, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchSparsekForward(const ForwardArgs& a, cudaStream_t stream, std::string* error) {
  const SparsekDims& d = a.dims;
  if (int64_t(d.B) * d.T * d.N == 0) return cudaSuccess;
  const FusedFwdParams p{d,
                         WindowMask(d),
                         d.window > 0 && d.S > 0,
                         ListedWindowKeys(d),
                         a.scale * kLog2e,
                         static_cast<const uint16_t*>(a.k),
                         static_cast<const uint16_t*>(a.v),
                         a.scores,
                         a.tau,
                         a.kth,
                         a.tile_keys,
                         a.tile_count,
                         a.key_rank,
                         a.lse};
  if (d.D == 64) {
    return a.bf16 ? Launch<true, 64>(a, p, stream, error) : Launch<false, 64>(a, p, stream, error);
  }
  return a.bf16 ? Launch<true, 128>(a, p, stream, error) : Launch<false, 128>(a, p, stream, error);
}

}  // namespace jax_sparsek::cuda::sparsek
