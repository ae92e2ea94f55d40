// SparseK selection on the CPU: for every query, the SparseK threshold tau_i of its candidates'
// scores and the k_select-th largest candidate (kth_i), in one O(S log S) pass per
// (batch, kv head).
//
// The candidates of query i + 1 are those of query i plus at most one key, so both outputs are
// maintained incrementally:
// - kth: a min-heap of the k_select best candidates in the (score, index) order; its front.
// - tau: the root of f(t) = sum_{j candidate} clip(u_j - t, 0, 1) = k_select. f is piecewise
//   linear with breakpoints {u_j, u_j - 1}; adding a candidate raises f, so tau never
//   decreases. One pointer walks the sorted breakpoints of *all* keys (breakpoints of keys that
//   are not candidates yet only split a linear piece in two) and stops at the last breakpoint
//   where f >= k_select; f at a point takes Fenwick-tree counts and sums over the candidates'
//   score ranks. Every step of the walk is O(log S), and the walk is 2S steps at most.
#include <cmath>
#include <limits>
#include <queue>

#include "sparsek/sparsek_cpu.h"

namespace jax_sparsek::sparsek {
namespace {

// Prefix sums over positions [0, n) with point updates, O(log n) each.
template <typename V>
class Fenwick {
 public:
  explicit Fenwick(int64_t n) : tree_(n + 1, V(0)) {}
  void Add(int64_t pos, V value) {
    for (int64_t x = pos + 1; x < int64_t(tree_.size()); x += x & -x) tree_[x] += value;
  }
  // Sum over positions [0, end).
  V Prefix(int64_t end) const {
    V total = 0;
    for (int64_t x = end; x > 0; x -= x & -x) total += tree_[x];
    return total;
  }

 private:
  std::vector<V> tree_;
};

// f(t) over a growing candidate set, and its monotone root. Everything is in double: u_j - 1
// and t + 1 are exact there for float scores, so breakpoints are compared exactly.
class ThresholdTracker {
 public:
  explicit ThresholdTracker(const std::vector<float>& u) : rank_(u.size()), count_(u.size()), sum_(u.size()) {
    const int64_t n = int64_t(u.size());
    std::vector<int32_t> order(n);
    for (int64_t j = 0; j < n; ++j) order[j] = int32_t(j);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return u[a] < u[b]; });
    sorted_.resize(n);
    for (int64_t r = 0; r < n; ++r) {
      sorted_[r] = u[order[r]];
      rank_[order[r]] = int32_t(r);
    }
    breakpoints_.reserve(2 * n);
    for (double x : sorted_) {
      breakpoints_.push_back(x);
      breakpoints_.push_back(x - 1.0);
    }
    std::sort(breakpoints_.begin(), breakpoints_.end());
  }

  void Insert(int64_t j) {
    count_.Add(rank_[j], 1);
    sum_.Add(rank_[j], sorted_[rank_[j]]);
    ++inserted_;
  }

  // f(t) = #{u >= t + 1} + sum_{t < u < t + 1} (u - t) over the inserted candidates.
  double F(double t) const {
    const int64_t lo = std::upper_bound(sorted_.begin(), sorted_.end(), t) - sorted_.begin();
    const int64_t hi = std::lower_bound(sorted_.begin(), sorted_.end(), t + 1.0) - sorted_.begin();
    const int64_t count_lo = count_.Prefix(lo), count_hi = count_.Prefix(hi);
    const double inside_sum = sum_.Prefix(hi) - sum_.Prefix(lo);
    return double(inserted_ - count_hi) + inside_sum - t * double(count_hi - count_lo);
  }

  // The largest t with f(t) = k; requires more than k inserted candidates. Calls must come with
  // a nondecreasing candidate set (the pointer never moves back).
  double Root(int64_t k) {
    const int64_t last = int64_t(breakpoints_.size()) - 1;
    // f(smallest breakpoint) counts every candidate, so f >= k holds at the pointer.
    while (pointer_ < last && F(breakpoints_[pointer_ + 1]) >= double(k)) ++pointer_;
    const double t_lo = breakpoints_[pointer_];
    // f(largest breakpoint) = 0 < k, so the pointer stops before the end.
    const double t_hi = breakpoints_[std::min(pointer_ + 1, last)];
    const double f_lo = F(t_lo), f_hi = F(t_hi);
    if (!(f_lo > double(k)) || !(f_lo > f_hi)) return t_lo;  // f(t_lo) == k: a flat piece ends here
    const double t = t_lo + (f_lo - double(k)) / (f_lo - f_hi) * (t_hi - t_lo);
    return std::min(std::max(t, t_lo), t_hi);
  }

 private:
  std::vector<double> sorted_;  // all keys' scores, ascending
  std::vector<int32_t> rank_;   // rank_[j]: position of key j in sorted_
  std::vector<double> breakpoints_;
  Fenwick<int64_t> count_;
  Fenwick<double> sum_;
  int64_t inserted_ = 0;
  int64_t pointer_ = 0;
};

// One (batch, kv head): u [S] contiguous; writes tau and kth for the T queries.
void SelectOne(const Problem& p, const std::vector<float>& u, float* tau, int32_t* kth) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  ThresholdTracker tracker(u);
  // Min-heap of the k_select best candidates; the front is the k-th best.
  auto stronger = [&](int32_t a, int32_t b) { return a != b && RanksAtLeast(u.data(), a, b); };
  std::priority_queue<int32_t, std::vector<int32_t>, decltype(stronger)> best(stronger);
  int64_t inserted = 0;
  float last_tau = neg_inf;
  int32_t last_kth = -1;
  for (int64_t i = 0; i < p.T; ++i) {
    const int64_t n = p.NumCandidates(i);
    if (n == inserted && i > 0) {  // same candidates as the previous query
      tau[i] = last_tau;
      kth[i] = last_kth;
      continue;
    }
    for (; inserted < n; ++inserted) {
      const int32_t j = int32_t(inserted);
      tracker.Insert(j);
      if (int64_t(best.size()) < p.k_select) {
        best.push(j);
      } else if (RanksAtLeast(u.data(), j, best.top())) {
        best.pop();
        best.push(j);
      }
    }
    if (n > p.k_select) {
      last_kth = best.top();
      last_tau = float(tracker.Root(p.k_select));
    } else {
      last_kth = -1;
      last_tau = neg_inf;
    }
    tau[i] = last_tau;
    kth[i] = last_kth;
  }
}

}  // namespace

void SelectCpu(const Problem& p, const float* scores, float* tau, int32_t* kth) {
  ParallelFor(p.B * p.K, [&](int64_t item) {
    const int64_t b = item / p.K, h = item % p.K;
    std::vector<float> u(p.S);
    for (int64_t j = 0; j < p.S; ++j) u[j] = scores[(b * p.S + j) * p.K + h];
    SelectOne(p, u, tau + item * p.T, kth + item * p.T);
  });
}

}  // namespace jax_sparsek::sparsek
