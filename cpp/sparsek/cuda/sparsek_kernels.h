// Launch interface of the CUDA SparseK kernels (SPEC.md section 4): parameter structs filled by
// the FFI handlers (ffi_handlers.cu) and one launcher per pass. Launchers enqueue on `stream`,
// never synchronize or allocate, and return the first launch error (cudaSuccess when all went in).
//
// Pipeline of one forward call:
//   select.cu      scores -> tau, kth per query (the CPU contract), per tile of kTileQueries
//                  queries the union of the tile's selected keys (key lists), and each key's
//                  rank in its row's score order (one compare decides a selection);
//   fwd_gather.cu  one wgmma kernel per 128-query tile: its window keys (contiguous rows),
//                  then its list's keys (gathered rows) with gates, one online softmax;
// and of the backward:
//   bwd_gather.cu  the window part by the flash backward kernel (fp32 dk/dv accumulation mode),
//                  the gathered keys query-major with fp32 atomics into dk/dv/dscores, then the
//                  tau term of dscores by prefix sums over the queries and the conversions.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/host_device.h"
#include "sparsek/cuda/select_algo.cuh"  // kTileQueries

namespace jax_sparsek::cuda::sparsek {

// Shapes and selection parameters: q [B,T,N,D], k/v [B,S,K,D], scores [B,S,K] fp32,
// tau/kth [B,K,T]. `window` is already clipped to S + T by the handler.
struct SparsekDims {
  int B, T, S, N, K, D;
  int k_select, window;
  bool causal;

  JSK_HD int group() const { return N / K; }
  JSK_HD int num_tiles() const { return (T + kTileQueries - 1) / kTileQueries; }
  // Most keys one tile's list can hold: its first query's selection plus one new candidate per
  // further query (causal), or the one shared selection (non-causal).
  JSK_HD int list_capacity() const { return (k_select < S ? k_select : S) + kTileQueries; }
};

// ---- selection (select.cu) ----------------------------------------------------------------
struct SelectArgs {
  SparsekDims dims;       // D is unused
  const float* scores;    // [B, S, K]
  float* tau;             // [B, K, T]  (contract of jax_sparsek_sparsek_select, sparsek_ffi.cc)
  int32_t* kth;           // [B, K, T]
  int32_t* tile_keys;     // [B, K, num_tiles, list_capacity]: ascending key indices
  int32_t* tile_count;    // [B, K, num_tiles]: entries used in each list
  int32_t* key_rank;      // [B, K, S]: rank of key j in its row's ascending (score, index)
                          // order; left unwritten when S <= k_select (no query drops a key)
  void* workspace;        // SelectWorkspaceBytes(dims) bytes, 256-byte aligned
  size_t workspace_bytes;
};

// Tile list of tile t of (b, kv head): every key selected by at least one of the tile's queries,
// i.e. {j < n_last : (u_j, j) >= (u_kth_first, kth_first)} (all j < n_last when kth_first = -1),
// where n_last is the candidate count of the tile's last query and kth_first the first query's
// kth; non-causal: the shared selection. A superset the gather kernels filter per query:
// query i selects candidate j iff key_rank[j] >= key_rank[kth_i] (kth_i >= 0).
size_t SelectWorkspaceBytes(const SparsekDims& dims);
cudaError_t LaunchSparsekSelect(const SelectArgs& args, cudaStream_t stream, std::string* error);

// ---- forward (fwd_gather.cu) ----------------------------------------------------------------
struct ForwardArgs {
  SparsekDims dims;
  bool bf16;
  float scale;
  const void *q, *k, *v;
  const float* scores;
  const float *tau;
  const int32_t *kth, *tile_keys, *tile_count, *key_rank;
  void* o;     // [B, T, N, D]
  float* lse;  // [B, N, T], natural log
};
cudaError_t LaunchSparsekForward(const ForwardArgs& args, cudaStream_t stream, std::string* error);

// ---- backward (bwd_gather.cu) ---------------------------------------------------------------
struct BackwardArgs {
  SparsekDims dims;
  bool bf16;
  float scale;
  const void *q, *k, *v, *o, *do_;
  const float* scores;
  const float *tau, *lse;
  const int32_t *kth, *tile_keys, *tile_count, *key_rank;
  void *dq, *dk, *dv;  // input dtype
  float* dscores;      // [B, S, K]
  void* workspace;     // BackwardWorkspaceBytes(dims) bytes, 256-byte aligned
  size_t workspace_bytes;
};
size_t BackwardWorkspaceBytes(const SparsekDims& dims);
cudaError_t LaunchSparsekBackward(const BackwardArgs& args, cudaStream_t stream, std::string* error);

}  // namespace jax_sparsek::cuda::sparsek
