// Brute-force check of bwd_tau.cuh, the index logic of the SparseK backward's tau term: random
// shapes, windows, causal / non-causal, nondecreasing tau rows with -inf heads and plateaus, and
// scores that hit tau_i and tau_i + 1 exactly; asserts that
//   - SupportQueries gives the CPU's [first_l, end_l) (attention_cpu.cc, std::upper_bound /
//     std::lower_bound) and exactly the queries whose support holds key l (O(T * S) scan);
//   - the difference array + prefix sums over those ranges (what bwd_gather.cu's tau kernels
//     compute) equal sum_{i : l in M_i} G_i / |M_i| summed directly.
// Plain C++ (not part of the extension):
//   g++ -std=c++17 -O2 -Icpp cpp/sparsek/cuda/bwd_tau_test.cc -o /tmp/bwd_tau_test && /tmp/bwd_tau_test
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "sparsek/cuda/bwd_tau.cuh"

using namespace jax_sparsek::cuda::sparsek;

int main() {
  std::mt19937 rng(7);
  auto uniform = [&](int n) { return int(rng() % unsigned(n)); };
  auto real = [&](float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); };
  const float kNegInf = -std::numeric_limits<float>::infinity();
  long checked = 0, fails = 0;
  double worst = 0.0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int T = 1 + uniform(160), S = 1 + uniform(160);
    const bool causal = uniform(4) != 0;
    const int window = uniform(3) == 0 ? 0 : uniform(S + T + 1);
    // Values on a quarter grid make plateaus and exact hits of tau and tau + 1.
    auto value = [&]() { return uniform(2) ? float(uniform(25) - 12) * 0.25f : real(-3.f, 3.f); };
    std::vector<float> tau(T), u(S);
    for (float& t : tau) t = value();
    std::sort(tau.begin(), tau.end());
    const int neg_inf = uniform(3) == 0 ? uniform(T + 1) : 0;  // queries with <= k_select candidates
    std::fill(tau.begin(), tau.begin() + neg_inf, kNegInf);
    if (!causal) std::fill(tau.begin(), tau.end(), tau[T - 1]);  // one shared tau
    for (int l = 0; l < S; ++l) {
      const int kind = uniform(4);
      const float t = tau[uniform(T)];
      u[l] = kind == 0 && std::isfinite(t) ? t : kind == 1 && std::isfinite(t) ? t + 1.0f : value();
    }

    // Ranges against the CPU's formula and against the per-query definition of M_i.
    std::vector<QueryRange> range(S);
    std::vector<std::vector<char>> in_support(T, std::vector<char>(S, 0));
    for (int l = 0; l < S; ++l) {
      range[l] = SupportQueries(tau.data(), T, S, window, causal, l, u[l]);
      int cpu_first, cpu_end;
      if (causal) {
        const double ul = u[l];
        const float* lo = std::upper_bound(tau.data(), tau.data() + T, ul - 1.0,
                                           [](double x, float t) { return x < double(t); });
        const float* hi = std::lower_bound(tau.data(), tau.data() + T, ul,
                                           [](float t, double x) { return double(t) < x; });
        const int64_t first_candidate = std::max<int64_t>(0, l + window - (S - T));
        cpu_first = int(std::min<int64_t>(T, std::max<int64_t>(lo - tau.data(), first_candidate)));
        cpu_end = std::max<int>(int(hi - tau.data()), cpu_first);
      } else {
        const bool in = InSoftSupport(u[l], tau[0]);
        cpu_first = 0;
        cpu_end = in ? T : 0;
      }
      const bool cpu_empty = cpu_end <= cpu_first, empty = range[l].end <= range[l].first;
      if (cpu_empty != empty || (!empty && (cpu_first != range[l].first || cpu_end != range[l].end))) {
        if (++fails <= 10)
          std::printf("FAIL cpu range: T=%d S=%d window=%d causal=%d l=%d u=%g: [%d,%d) vs cpu [%d,%d)\n",
                      T, S, window, int(causal), l, u[l], range[l].first, range[l].end, cpu_first, cpu_end);
      }
      for (int i = 0; i < T; ++i) {
        const bool candidate = !causal || int64_t(i) + S - T - window >= l;
        in_support[i][l] = candidate && (causal ? (double(u[l]) - 1.0 < double(tau[i]) &&
                                                   double(tau[i]) < double(u[l]))
                                                : InSoftSupport(u[l], tau[i]));
        const bool in_range = i >= range[l].first && i < range[l].end;
        ++checked;
        if (in_range != bool(in_support[i][l]) && ++fails <= 10) {
          std::printf("FAIL membership: T=%d S=%d window=%d causal=%d l=%d i=%d u=%g tau=%g: %d vs %d\n",
                      T, S, window, int(causal), l, i, u[l], tau[i], int(in_range),
                      int(in_support[i][l]));
        }
      }
    }

    // The tau term by difference array + prefix sums, as the GPU kernels compute it.
    std::vector<double> grad(T);
    for (double& x : grad) x = real(-1.f, 1.f);
    std::vector<int> diff(T, 0);
    for (const QueryRange& r : range) {
      if (r.first >= r.end) continue;
      diff[r.first] += 1;
      if (r.end < T) diff[r.end] -= 1;
    }
    std::vector<double> prefix(T + 1, 0.0);
    int size = 0;
    for (int i = 0; i < T; ++i) {
      size += diff[i];
      prefix[i + 1] = prefix[i] + (size > 0 ? grad[i] / size : 0.0);
    }
    std::vector<double> direct(S, 0.0);
    for (int i = 0; i < T; ++i) {
      int members = 0;
      for (int l = 0; l < S; ++l) members += in_support[i][l];
      for (int l = 0; l < S; ++l)
        if (in_support[i][l]) direct[l] += grad[i] / members;
    }
    for (int l = 0; l < S; ++l) {
      const double fast = range[l].end > range[l].first ? prefix[range[l].end] - prefix[range[l].first] : 0.0;
      const double err = std::fabs(fast - direct[l]);
      worst = std::max(worst, err);
      if (err > 1e-9 && ++fails <= 10)
        std::printf("FAIL tau term: T=%d S=%d l=%d: %.17g vs %.17g\n", T, S, l, fast, direct[l]);
    }
  }
  std::printf("%ld (query, key) pairs checked, %ld failures, tau term max abs error %.3g\n", checked,
              fails, worst);
  return fails == 0 ? 0 : 1;
}
