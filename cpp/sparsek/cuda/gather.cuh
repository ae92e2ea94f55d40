// A query tile's key list (select.cu), and the backward gather kernel's loads of it in chunks
// (128 threads, 64-row tiles in the swizzled tile format of ptx.cuh, two stages).
#pragma once

#include <cstdint>

#include "flash_attention/cuda/ptx.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {

constexpr int kGatherThreads = 128, kGatherRows = 64;

// Gathers 64 rows of two [*, D] 16-bit tensors with the same row offsets into the swizzled
// tiles at dst_a / dst_b: row r comes from src + row_offset(r), zero-filled when the offset is
// negative. 16-byte pieces, consecutive threads on consecutive pieces of a row.
template <int D, typename RowOffset>
__device__ __forceinline__ void gather_rows(uint32_t dst_a, const uint16_t* src_a, uint32_t dst_b,
                                            const uint16_t* src_b, RowOffset row_offset) {
  constexpr int kPieces = D / 8, kRowsPerPass = kGatherThreads / kPieces;
  constexpr int kPasses = kGatherRows / kRowsPerPass;
  const int piece = threadIdx.x % kPieces, row0 = threadIdx.x / kPieces;
  int64_t offset[kPasses];  // all index loads first, then the copies
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) offset[pass] = row_offset(row0 + pass * kRowsPerPass);
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = row0 + pass * kRowsPerPass;
    const bool valid = offset[pass] >= 0;
    const int64_t at = (valid ? offset[pass] : 0) + piece * 8;
    cp_async_16(tile_addr(dst_a, kGatherRows, r, piece * 8), src_a + at, valid);
    cp_async_16(tile_addr(dst_b, kGatherRows, r, piece * 8), src_b + at, valid);
  }
}

// The key list of one query tile of (batch b, kv head h), the scores of that kv head and their
// ranks.
struct TileKeyList {
  const int32_t* keys;
  int count;             // clamped to the list capacity (or trimmed, TrimFrom)
  const float* u;        // u_j = u[j * K]
  const int32_t* rank;   // rank of key j = rank[j] (select.cu's key_rank row)
  int64_t bh;            // b * K + h

  __device__ __forceinline__ TileKeyList(const SparsekDims& d, const int32_t* tile_keys,
                                         const int32_t* tile_count, const int32_t* key_rank,
                                         const float* scores, int b, int h, int tile)
      : bh(int64_t(b) * d.K + h) {
    keys = tile_keys + (bh * d.num_tiles() + tile) * d.list_capacity();
    count = min(max(tile_count[bh * d.num_tiles() + tile], 0), d.list_capacity());
    u = scores + int64_t(b) * d.S * d.K + h;
    rank = key_rank + bh * d.S;
  }

  // Drops the entries >= key_end, which form the list's tail (it ascends) and which a CTA that
  // serves only the first queries of the list's tile never selects: every one of the
  // kGatherThreads threads calls it. The tail is at most kGatherThreads long here (the keys
  // of the tile's other queries' extra candidates).
  __device__ __forceinline__ void TrimFrom(int key_end) {
    const int e = count - kGatherThreads + int(threadIdx.x);
    count -= __syncthreads_count(e >= 0 && keys[e] >= key_end);
  }

  // Key index of entry e: -1 past the count, or for an index outside [0, S) (the lists come
  // from the select call; a caller's bad buffer must not read out of bounds).
  __device__ __forceinline__ int key(int e, int S) const {
    const int j = e < count ? keys[e] : -1;
    return j >= 0 && j < S ? j : -1;
  }

  // Chunk c (64 entries) into one stage: the K and V rows (tiles at k_dst / v_dst), the key
  // indices (keys_dst, -1 = padding) and their scores (u_dst, 0 for padding), then one cp.async
  // commit group
  // (also when c is past the list, so that cp_async_wait<1> always means "chunk c landed").
  template <int D>
  __device__ __forceinline__ void Gather(const SparsekDims& d, int b, int h, int c, const uint16_t* k,
                                         const uint16_t* v, uint32_t k_dst, uint32_t v_dst,
                                         int32_t* keys_dst, float* u_dst) const {
    if (c * kGatherRows < count) {
      gather_rows<D>(k_dst, k, v_dst, v, [&](int r) -> int64_t {
        const int j = key(c * kGatherRows + r, d.S);
        return j >= 0 ? ((int64_t(b) * d.S + j) * d.K + h) * D : -1;
      });
      const int t = threadIdx.x;
      if (t < kGatherRows) {
        const int j = key(c * kGatherRows + t, d.S);
        keys_dst[t] = j;
        cp_async_4(smem_u32(u_dst + t), u + int64_t(j >= 0 ? j : 0) * d.K, j >= 0);
      }
    }
    cp_async_commit();
  }
};

}  // namespace jax_sparsek::cuda::sparsek
