// Which gathered key a query attends and with what gate (SPEC.md section 4), shared by the
// forward and backward kernels so that both passes see the same keys. The window keys run
// apart from the listed ones (window chunks in the forward, the flash backward with a window
// mask in the backward), so a listed key never carries the window's gate: causal windows and
// candidate sets are disjoint, and non-causal queries skip listed keys inside their window.
#pragma once

#include <climits>
#include <cstdint>

#include "flash_attention/cuda/masking.cuh"
#include "sparsek/cuda/select_algo.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {

// The window keys' mask (the forward's window chunks, the flash backward's window part): causal p_i - window < j <= p_i, non-causal
// |p_i - j| < window (callers run it only when window > 0).
inline MaskSpec WindowMask(const SparsekDims& d) {
  MaskSpec m;
  m.T = d.T;
  m.S = d.S;
  m.causal = d.causal;
  m.left = d.window - 1;
  m.right = d.causal ? -1 : d.window - 1;
  return m;
}

// How many listed keys around its position a query skips because its window holds them:
// 2 * window - 1 (|p_i - j| < window) when non-causal, none when causal (the window keys are
// never candidates) or without a window.
inline unsigned ListedWindowKeys(const SparsekDims& d) {
  return d.causal || d.window <= 0 ? 0u : 2u * unsigned(d.window) - 1u;
}

// One query's selection: candidates are keys [0, num_candidates); a candidate is selected iff
// (u_j, j) >= (u_kth, kth), always when kth < 0. select.cu ranks every key in that order
// (key_rank), so the same test is rank_j >= rank of kth: one compare, which the forward uses;
// the backward, whose shared memory has no room for the ranks, compares scores.
struct QuerySelection {
  int num_candidates;
  int kth;
  float u_kth;
  int min_rank;  // rank of kth, INT_MIN when kth < 0
  float tau;     // -inf: every selected key has gate 1
  int position;

  // Query i of a [T] sequence against S keys, for kv head row `u` (scores of key j at
  // u[j * u_stride]) and the selection outputs of that (batch, kv head): tau, kth, key ranks.
  __device__ __forceinline__ static QuerySelection Load(int i, int T, int S, int window, bool causal,
                                                        const float* u, int u_stride,
                                                        const float* tau_row,
                                                        const int32_t* kth_row,
                                                        const int32_t* key_rank_row) {
    QuerySelection q;
    q.position = i + S - T;
    q.num_candidates = NumCandidates(i, T, S, window, causal);
    // kth comes from the select call; one outside [-1, n) (a caller's bad buffer) would index
    // out of bounds, so it selects every candidate instead.
    const int kth = kth_row[i];
    q.kth = kth >= 0 && kth < q.num_candidates ? kth : -1;
    q.u_kth = q.kth >= 0 ? u[int64_t(q.kth) * u_stride] : 0.f;
    q.min_rank = q.kth >= 0 ? key_rank_row[q.kth] : INT_MIN;
    q.tau = tau_row[i];
    return q;
  }

  // A query that selects nothing (rows past T).
  __device__ __forceinline__ static QuerySelection None() {
    return {0, -1, 0.f, INT_MIN, -INFINITY, 0};
  }

  // The gate of listed key j (rank rank_j, score uj) in the forward: SoftGate(uj) when selected
  // and not among the window_keys = ListedWindowKeys(dims) keys from p_i - window + 1 that the
  // query's window takes, else 0. No branch: a chunk's 128 x 64 gates compile to straight-line
  // code.
  __device__ __forceinline__ float ListedGate(int j, int rank_j, float uj, int window,
                                              unsigned window_keys) const {
    const unsigned past_window_lo = unsigned(j) - unsigned(position - window + 1);
    const bool keep =
        (j < num_candidates) & (rank_j >= min_rank) & (past_window_lo >= window_keys);
    return keep ? SoftGate(uj) : 0.f;
  }

  __device__ __forceinline__ bool SelectsByScore(int j, float uj) const {
    return j < num_candidates && (kth < 0 || uj > u_kth || (uj == u_kth && j >= kth));
  }

  // Gate of listed key j with score uj: clip(uj - tau, 0, 1) when selected (and, non-causal,
  // outside the query's window), else 0.
  __device__ __forceinline__ float Gate(bool selected, int j, float uj, bool causal,
                                        int window) const {
    if (!selected) return 0.f;
    if (!causal) {
      const int dist = position > j ? position - j : j - position;
      if (dist < window) return 0.f;
    }
    return SoftGate(uj);
  }

  // clip(uj - tau, 0, 1): the gate of a selected key outside the query's window.
  __device__ __forceinline__ float SoftGate(float uj) const { return __saturatef(uj - tau); }

  // 0 < uj - tau < 1 decided in double as the CPU kernel does: the gate depends on the scores.
  __device__ __forceinline__ bool Soft(float uj) const {
    return double(uj) > double(tau) && double(uj) < double(tau) + 1.0;
  }
};

}  // namespace jax_sparsek::cuda::sparsek
