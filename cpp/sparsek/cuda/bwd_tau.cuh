// Index logic of the tau term of the SparseK backward (BackwardItem in sparsek/attention_cpu.cc):
// which queries have key l in the support M_i of their soft mask. Shared by bwd_gather.cu and
// its host test; plain C++ can include this header too:
//   g++ -std=c++17 -O2 -Icpp cpp/sparsek/cuda/bwd_tau_test.cc -o /tmp/bwd_tau_test && /tmp/bwd_tau_test
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define JSK_TAU_HD __host__ __device__ __forceinline__
#else
#define JSK_TAU_HD inline
#endif

namespace jax_sparsek::cuda::sparsek {

// tau < u < tau + 1 decided in double, exact for float inputs (InSupport on the CPU,
// QuerySelection::Soft on the GPU). Never true when tau = -inf.
JSK_TAU_HD bool InSoftSupport(float u, float tau) {
  return double(u) > double(tau) && double(u) < double(tau) + 1.0;
}

// Queries [first, end) of one (batch, kv head); empty when end <= first.
struct QueryRange {
  int first, end;
};

// The queries i with key l in M_i = {l a candidate of i, tau_i < u_l < tau_i + 1}. tau_row (T
// entries) is nondecreasing, so the range is contiguous: two binary searches, written as the
// CPU's std::upper_bound / std::lower_bound (same halving, same predicates) so that both pick
// the same indices. Non-causal: one tau (tau_row[0]) shared by every query, all keys candidates.
JSK_TAU_HD QueryRange SupportQueries(const float* tau_row, int T, int S, int window, bool causal,
                                     int l, float ul) {
  if (!causal) return InSoftSupport(ul, tau_row[0]) ? QueryRange{0, T} : QueryRange{0, 0};
  const double u = ul;
  // lo: first i with u_l - 1 < tau_i (upper_bound of u_l - 1).
  int lo = 0;
  for (int len = T; len > 0;) {
    const int half = len / 2;
    if (u - 1.0 < double(tau_row[lo + half])) {
      len = half;
    } else {
      lo += half + 1;
      len -= half + 1;
    }
  }
  // hi: first i with !(tau_i < u_l) (lower_bound of u_l).
  int hi = 0;
  for (int len = T; len > 0;) {
    const int half = len / 2;
    if (double(tau_row[hi + half]) < u) {
      hi += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  // Query i has l as a candidate iff p_i - window >= l, i.e. i >= l + window - (S - T).
  const int64_t first_candidate = int64_t(l) + window - (int64_t(S) - T);
  int64_t first = lo > first_candidate ? lo : first_candidate;  // >= 0
  if (first > T) first = T;
  return {int(first), hi > first ? hi : int(first)};
}

}  // namespace jax_sparsek::cuda::sparsek
