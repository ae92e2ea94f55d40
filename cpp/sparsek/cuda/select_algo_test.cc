// Brute-force check of select_algo.cuh, the per-row logic of the CUDA selection (select.cu):
// builds a row's structures sequentially with the header's level functions, answers every query
// with the header's SelectQuery (on the wavelet matrix and, where the row's queries qualify, on
// the prefix sums too), and compares with the definitions on random rows (normal
// scores, ties from a few integers or halves, signed zeros; small and large S, T != S, window
// 0, k_select >= S, causal or not):
//   - kth: the k-th strongest candidate in the (score, index) order, exactly;
//   - tau: the largest root of sum_j clip(u_j - t, 0, 1) = k over the candidates, solved from
//     the sorted breakpoints in long double, to 1e-6 relative (and counts bit-exact results);
//   - tau nondecreasing along the queries;
//   - the tile lists (TileList) against their definition, every query's selection inside its
//     tile's list, and the list_capacity() bound.
// Plain C++ (not part of the extension), about 20 s:
//   g++ -std=c++17 -O2 -Icpp cpp/sparsek/cuda/select_algo_test.cc -o /tmp/select_algo_test &&
//     /tmp/select_algo_test
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "sparsek/cuda/select_algo.cuh"

using namespace jax_sparsek::cuda::sparsek;

namespace {


uint32_t BitsOf(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
float FloatOf(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// (u_a, a) ranks at or above (u_b, b).
bool AtLeast(const std::vector<float>& u, int a, int b) {
  return u[a] > u[b] || (u[a] == u[b] && a >= b);
}

// One row's structures, built sequentially the way select.cu lays them out.
struct HostRow {
  int S, levels;
  std::vector<float> sorted_scores;
  std::vector<int32_t> key_at_rank, rank_of;
  std::vector<RankWord> words;
  std::vector<double> zero_sums;

  explicit HostRow(const std::vector<float>& u) : S(int(u.size())), levels(WaveletLevels(S)) {
    std::vector<uint32_t> keys(S);
    for (int j = 0; j < S; ++j) keys[j] = SortKeyOfScore(BitsOf(u[j]));
    key_at_rank.resize(S);
    std::iota(key_at_rank.begin(), key_at_rank.end(), 0);
    std::stable_sort(key_at_rank.begin(), key_at_rank.end(),
                     [&](int a, int b) { return keys[a] < keys[b]; });
    sorted_scores.resize(S);
    rank_of.resize(S);
    for (int r = 0; r < S; ++r) {
      sorted_scores[r] = FloatOf(ScoreOfSortKey(keys[key_at_rank[r]]));
      rank_of[key_at_rank[r]] = r;
    }
    words.assign(size_t(levels) * WordsPerLevel(S), RankWord{~0u, ~0u});  // poison: all written
    zero_sums.assign(size_t(levels) * (S + 1), NAN);
    std::vector<int32_t> ranks = rank_of, next(S);
    for (int l = 0; l < levels; ++l) {
      const LevelBuild b{S, levels, l, ranks.data(), l + 1 < levels ? next.data() : nullptr,
                         words.data() + size_t(l) * WordsPerLevel(S),
                         zero_sums.data() + size_t(l) * (S + 1)};
      int ones = 0;
      double zero_sum = 0.0;
      for (int x = 0; x < S; ++x) {
        if (x % 32 == 0) {
          uint32_t bits = 0;
          for (int i = 0; i < 32 && x + i < S; ++i) bits |= uint32_t(b.is_one(ranks[x + i])) << i;
          StoreWord(b, x / 32, ones, bits);
        }
        PlaceEntry(b, x, ranks[x], ones, zero_sum);
        if (b.is_one(ranks[x])) {
          ++ones;
        } else {
          zero_sum += sorted_scores[ranks[x]];
        }
      }
      FinishLevel(b, ones, zero_sum);
      ranks.swap(next);
    }
  }

  RowStructures view() const {
    return {S, levels, sorted_scores.data(), key_at_rank.data(), words.data(), zero_sums.data()};
  }
};

// The prefix sums of PrefixRow for keys [0, n_base), by their definition.
struct HostPrefix {
  std::vector<int32_t> below_count;
  std::vector<double> below_sum;
  PrefixRow row;

  HostPrefix(const HostRow& h, int n_base) : below_count(h.S + 1, 0), below_sum(h.S + 1, 0.0) {
    for (int r = 0; r < h.S; ++r) {
      const bool in = h.key_at_rank[r] < n_base;
      below_count[r + 1] = below_count[r] + in;
      below_sum[r + 1] = below_sum[r] + (in ? double(h.sorted_scores[r]) : 0.0);
    }
    row = {h.S, n_base, h.sorted_scores.data(), h.key_at_rank.data(), h.rank_of.data(),
           below_count.data(), below_sum.data()};
  }
};

// tau by definition: the last breakpoint with f >= k, then linear to the next one.
long double BruteTau(const std::vector<float>& u, int n, int k) {
  auto f = [&](long double t) {
    long double s = 0;
    for (int j = 0; j < n; ++j) s += std::min<long double>(std::max<long double>(u[j] - t, 0), 1);
    return s;
  };
  std::vector<long double> bp;
  for (int j = 0; j < n; ++j) {
    bp.push_back(u[j]);
    bp.push_back((long double)u[j] - 1);
  }
  std::sort(bp.begin(), bp.end());
  bp.erase(std::unique(bp.begin(), bp.end()), bp.end());
  // f is nonincreasing, f(bp[0]) = n > k and f(bp.back()) = 0: bisect for the last f >= k.
  size_t p = 0, end = bp.size() - 1;
  while (p + 1 < end) {
    const size_t mid = (p + end) / 2;
    if (f(bp[mid]) >= k) {
      p = mid;
    } else {
      end = mid;
    }
  }
  const long double f_lo = f(bp[p]), f_hi = f(bp[p + 1]);
  if (f_lo == k) return bp[p];
  return bp[p] + (f_lo - k) / (f_lo - f_hi) * (bp[p + 1] - bp[p]);
}

struct Stats {
  long queries = 0, prefix_queries = 0, exact_tau = 0, lists = 0, fails = 0;
  double worst_rel = 0;
};

void CheckRow(const std::vector<float>& u, int T, int k, int window, bool causal,
              const char* kind, Stats* st) {
  const int S = int(u.size());
  auto fail = [&](const char* what, int i, double a, double b) {
    if (++st->fails <= 12) {
      std::printf("FAIL %s: %s S=%d T=%d k=%d window=%d causal=%d i=%d got %.9g want %.9g\n", what,
                  kind, S, T, k, window, int(causal), i, a, b);
    }
  };
  const HostRow host(u);
  const RowStructures row = host.view();
  const int n_base = PrefixBase(T, S, window, causal);
  const bool prefix_path = UsesPrefixSums(T, S, window, causal);
  const HostPrefix prefix(host, n_base);
  std::vector<int> kth(T);
  std::vector<float> tau(T);
  for (int i = 0; i < T; ++i) {
    const int n = NumCandidates(i, T, S, window, causal);
    const QuerySelectResult r = SelectQuery(row, n, k);
    if (prefix_path) {
      const QuerySelectResult rp = SelectQuery(prefix.row, n, k);
      ++st->prefix_queries;
      if (rp.kth != r.kth) fail("prefix path kth", i, rp.kth, r.kth);
      const double rel = std::fabs(double(rp.tau) - r.tau) / std::max(1.0, std::fabs(double(r.tau)));
      if (!(rel <= 1e-6) && !(rp.tau == r.tau)) fail("prefix path tau", i, rp.tau, r.tau);
    }
    kth[i] = r.kth;
    tau[i] = r.tau;
    ++st->queries;
    if (n <= k) {
      if (r.kth != -1 || !(std::isinf(r.tau) && r.tau < 0)) fail("n <= k", i, r.tau, -INFINITY);
      continue;
    }
    std::vector<int> cand(n);
    std::iota(cand.begin(), cand.end(), 0);
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                     [&](int a, int b) { return a != b && AtLeast(u, a, b); });
    if (r.kth != cand[k - 1]) fail("kth", i, r.kth, cand[k - 1]);
    const float want = float(BruteTau(u, n, k));
    const double rel = std::fabs(double(r.tau) - want) / std::max(1.0, std::fabs(double(want)));
    st->worst_rel = std::max(st->worst_rel, rel);
    st->exact_tau += r.tau == want;
    if (!(rel <= 1e-6)) fail("tau", i, r.tau, want);
    if (i > 0 && tau[i - 1] > r.tau) fail("tau decreases", i, r.tau, tau[i - 1]);
  }
  // Tile lists.
  const int capacity = std::min(k, S) + kTileQueries;
  for (int first = 0; first < T; first += kTileQueries) {
    const int last = std::min(first + kTileQueries, T) - 1;
    const TileListSpec spec = TileList(last, T, S, window, causal, kth[first], host.rank_of.data());
    std::vector<int> list;
    for (int j = 0; j < spec.num_keys; ++j) {
      if (host.rank_of[j] >= spec.min_rank) list.push_back(j);
    }
    ++st->lists;
    const int n_last = NumCandidates(last, T, S, window, causal);
    std::vector<int> want;
    for (int j = 0; j < n_last; ++j) {
      if (kth[first] < 0 || AtLeast(u, j, kth[first])) want.push_back(j);
    }
    if (list != want) fail("tile list", first, list.size(), want.size());
    if (int(list.size()) > capacity) fail("tile list capacity", first, list.size(), capacity);
    for (int i = first; i <= last; ++i) {
      const int n = NumCandidates(i, T, S, window, causal);
      for (int j = 0; j < n; ++j) {
        const bool selected = kth[i] < 0 || AtLeast(u, j, kth[i]);
        if (selected && !std::binary_search(list.begin(), list.end(), j)) {
          fail("selected key missing from its tile list", i, j, 0);
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  auto uniform = [&](int n) { return int(rng() % unsigned(n)); };
  Stats st;

  // Sort keys: float order, -0 == +0, and the round trip.
  const float samples[] = {-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-30f, 0.5f, 2.0f, INFINITY};
  for (float a : samples) {
    for (float b : samples) {
      const uint32_t ka = SortKeyOfScore(BitsOf(a)), kb = SortKeyOfScore(BitsOf(b));
      if ((a < b) != (ka < kb) || (a == b) != (ka == kb)) {
        ++st.fails;
        std::printf("FAIL sort key %g %g\n", a, b);
      }
    }
    if (FloatOf(ScoreOfSortKey(SortKeyOfScore(BitsOf(a)))) != a) {
      ++st.fails;
      std::printf("FAIL sort key round trip %g\n", a);
    }
  }
  for (int S = 1; S < 5000; S += 1 + S / 3) {
    const int levels = WaveletLevels(S);
    if ((int64_t(1) << levels) <= S || (levels > 1 && (int64_t(1) << (levels - 1)) > S)) {
      ++st.fails;
      std::printf("FAIL levels S=%d\n", S);
    }
    for (int l = 0; l < levels; ++l) {
      int zeros = 0;
      for (int r = 0; r < S; ++r) zeros += !((r >> (levels - 1 - l)) & 1);
      if (zeros != ZerosAtLevel(S, levels, l)) {
        ++st.fails;
        std::printf("FAIL zeros S=%d level=%d\n", S, l);
      }
    }
  }

  const char* kinds[] = {"normal", "integers", "halves", "signed zeros", "wide"};
  for (int trial = 0; trial < 3000; ++trial) {
    const int size_class = uniform(10);
    const int S = size_class < 4   ? 1 + uniform(10)
                  : size_class < 9 ? 1 + uniform(200)
                                   : 500 + uniform(1600);
    const int T = uniform(4) == 0 ? 1 : uniform(3) == 0 ? S : 1 + uniform(S + 80);
    const int k = uniform(8) == 0 ? S + uniform(3) : 1 + uniform(std::min(S, 1 + uniform(80)));
    const int window = uniform(3) == 0 ? 0 : uniform(std::min(S + T, 1 + uniform(300)) + 1);
    const bool causal = uniform(4) != 0;
    const int kind = uniform(5);
    std::normal_distribution<float> normal(uniform(3) - 1.0f, kind == 4 ? 20.0f : 1.0f);
    std::vector<float> u(S);
    for (float& x : u) {
      switch (kind) {
        case 1: x = float(uniform(4)); break;
        case 2: x = 0.5f * float(uniform(7)) - 1.0f; break;
        case 3: x = uniform(3) == 0 ? (uniform(2) ? 0.0f : -0.0f) : float(uniform(3)) - 1.0f; break;
        default: x = normal(rng); break;
      }
    }
    CheckRow(u, T, k, window, causal, kinds[kind], &st);
  }
  if (st.prefix_queries == 0) {  // the prefix path must be exercised
    ++st.fails;
    std::printf("FAIL no query ran on the prefix sums\n");
  }
  std::printf("select_algo_test: %ld queries (%ld tau bit-exact, worst relative error %.3g; "
              "%ld also on prefix sums), %ld tile lists, %ld failures\n",
              st.queries, st.exact_tau, st.worst_rel, st.prefix_queries, st.lists, st.fails);
  return st.fails != 0;
}
