// CPU SparseK attention (SPEC.md section 4): problem geometry, the incrementally maintained
// selection of one (batch, kv head), and the three kernels the FFI handlers call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/ffi_helpers.h"

namespace jax_sparsek::sparsek {

struct Problem {
  int64_t B, T, S, N, K, D, Dv;
  int64_t k_select, window;
  bool causal;
  float scale;

  int64_t group() const { return N / K; }
  // Query i sits at absolute position p_i = i + S - T (bottom-right alignment).
  int64_t position(int64_t i) const { return i + S - T; }
  // Candidates of query i are the keys [0, NumCandidates(i)): j <= p_i - window when causal,
  // every key otherwise. Nondecreasing in i.
  int64_t NumCandidates(int64_t i) const {
    return causal ? std::clamp<int64_t>(position(i) - window + 1, 0, S) : S;
  }
  // Window keys [*lo, *hi) of query i: p_i - window < j <= p_i when causal,
  // |p_i - j| < window otherwise. Empty when window == 0.
  void WindowRange(int64_t i, int64_t* lo, int64_t* hi) const {
    const int64_t p = position(i);
    *lo = std::max<int64_t>(0, p - window + 1);
    *hi = std::min<int64_t>(S, causal ? p + 1 : p + window);
    if (*hi < *lo) *hi = *lo;
  }
};

// (u_a, a) >= (u_b, b) in the selection order: larger score first, ties to the larger index.
inline bool RanksAtLeast(const float* u, int32_t a, int32_t b) {
  return u[a] > u[b] || (u[a] == u[b] && a >= b);
}

// The selected set T_i of one (batch, kv head) as the queries advance: key j is selected by
// query i iff it is a candidate and (u_j, j) >= (u_kth, kth) in the (score, index) order, or
// every candidate when kth == -1. The threshold only rises and the candidates only grow, so
// the set changes by pushes and pops on a min-heap (its front is the weakest member).
class SelectedSet {
 public:
  explicit SelectedSet(const float* u) : u_(u) {}

  // Brings the set to a query with `num_candidates` candidates and threshold key `kth`.
  // A candidate below the threshold when it arrives can never be selected later.
  void Advance(int64_t num_candidates, int32_t kth) {
    for (; inserted_ < num_candidates; ++inserted_) {
      if (kth < 0 || AtLeast(int32_t(inserted_), kth)) {
        heap_.push_back(int32_t(inserted_));
        std::push_heap(heap_.begin(), heap_.end(), Stronger{u_});
      }
    }
    if (kth < 0) return;
    while (!heap_.empty() && !AtLeast(heap_.front(), kth)) {
      std::pop_heap(heap_.begin(), heap_.end(), Stronger{u_});
      heap_.pop_back();
    }
  }

  // The members, in no particular order.
  const std::vector<int32_t>& members() const { return heap_; }

 private:
  bool AtLeast(int32_t a, int32_t b) const { return RanksAtLeast(u_, a, b); }
  // Heap order: std heaps keep the comparator's largest element in front, so comparing by
  // "stronger than" keeps the weakest member in front.
  struct Stronger {
    const float* u;
    bool operator()(int32_t a, int32_t b) const { return a != b && RanksAtLeast(u, a, b); }
  };

  const float* u_;
  int64_t inserted_ = 0;
  std::vector<int32_t> heap_;
};

// tau_i < u_j < tau_i + 1, decided in double so that it is exact for float inputs: key j is in
// the support M_i of query i's soft mask (0 < m_ij < 1). Never true when tau_i = -inf.
inline bool InSupport(float u, float tau) {
  return double(u) > double(tau) && double(u) < double(tau) + 1.0;
}

// jax_sparsek_sparsek_select: scores [B, S, K] -> tau, kth [B, K, T].
void SelectCpu(const Problem& p, const float* scores, float* tau, int32_t* kth);

// jax_sparsek_sparsek_fwd: o [B, T, N, Dv] (T = the input storage type), lse [B, N, T].
template <typename T>
void ForwardCpu(const Problem& p, const T* q, const T* k, const T* v, const float* scores,
                const float* tau, const int32_t* kth, T* o, float* lse);

// jax_sparsek_sparsek_bwd: dq, dk, dv (storage type T) and dscores [B, S, K] float32.
template <typename T>
void BackwardCpu(const Problem& p, const T* q, const T* k, const T* v, const float* scores,
                 const float* tau, const int32_t* kth, const T* o, const float* lse,
                 const T* dout, T* dq, T* dk, T* dv, float* dscores);

}  // namespace jax_sparsek::sparsek
