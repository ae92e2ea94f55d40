// Per-row logic of the SparseK selection pass (select.cu). A row is one (batch, kv head) with
// scores u_j, j < S; query i has the candidates [0, n_i) and needs
//   kth_i: the k-th strongest candidate in the (score, index) order (ties: larger j stronger),
//   tau_i: the largest root of f(t) = sum_{j < n_i} clip(u_j - t, 0, 1) = k.
// Each query is answered on its own, in O(log S) per Newton step on f (a handful of steps; with
// prefix sums O(log S + extras), kth in O(log S * extras)), from structures built once per row:
//   sorted_scores[r], key_at_rank[r]: the scores sorted ascending in that order (rank r = the
//     r-th weakest key) and their key indices; rank_of[j] the inverse permutation;
//   a wavelet matrix over the sequence rank_of[0..S) (key order), which gives for any prefix of
//     keys [0, n) the m-th smallest rank, and the count and score sum of the ranks below r;
//   or, when every query of the row has between n_base and n_base + kMaxPrefixExtras candidates
//     (a few causal queries, or non-causal ones: all share n = S), the count and score sum of
//     the keys [0, n_base) below each rank (PrefixRow), the few keys past n_base read one by one.
// Everything here is plain code on those arrays so that select_algo_test.cc runs it on the host
// against brute force (g++ -std=c++17 -O2 -Icpp cpp/sparsek/cuda/select_algo_test.cc).
//
// Wavelet matrix: `levels` = bit width of S, so that every rank and S itself fit. Level l splits
// its sequence X_l (X_0 = rank_of) by bit (levels - 1 - l) of the rank: X_{l+1} is the entries
// with that bit 0, then those with it 1, each group in X_l's order. Per level, for X_l:
//   words[w]: bits of entries [32w, 32w + 32) (bit set = goes to the ones) and the number of
//     ones before entry 32w, WordsPerLevel(S) of them (the last one is a sentinel when 32 | S);
//   zero_sums[x], x <= zeros: the score sum of the first x entries of X_{l+1}, i.e. of the zeros,
//     in double (S + 1 slots per level; the ones' part is never read).
// A range [lo, hi) of X_l continues in X_{l+1} as [lo - ones(lo), hi - ones(hi)) for its zeros
// and [Z + ones(lo), Z + ones(hi)) for its ones, with ones(x) the ones before entry x and Z the
// level's zero count.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace jax_sparsek::cuda::sparsek {

JSK_HD int PopCount(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Candidates of query i are the keys [0, NumCandidates): j <= p_i - window with
// p_i = i + S - T when causal, every key otherwise.
JSK_HD int NumCandidates(int i, int T, int S, int window, bool causal) {
  if (!causal) return S;
  const int64_t n = int64_t(i) + S - T - window + 1;
  return n < 0 ? 0 : (n > S ? S : int(n));
}

// Sort key of a score, from its float bits: unsigned order = float order, with -0 == +0 so that
// equal scores fall back to the index order (the stable sort keeps keys ascending).
JSK_HD uint32_t SortKeyOfScore(uint32_t bits) {
  if ((bits & 0x7fffffffu) == 0) bits = 0;
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}
JSK_HD uint32_t ScoreOfSortKey(uint32_t key) {
  return (key & 0x80000000u) ? key & 0x7fffffffu : ~key;
}

// ---- wavelet matrix -------------------------------------------------------------------------
struct alignas(8) RankWord {
  uint32_t ones_before;  // ones among the level's entries before this word
  uint32_t bits;
};

JSK_HD int WaveletLevels(int S) {
  int levels = 1;
  while ((int64_t(1) << levels) <= S) ++levels;
  return levels;
}
JSK_HD int WordsPerLevel(int S) { return S / 32 + 1; }

// Entries of level `level` whose bit is 0: every X_l is a permutation of the ranks [0, S), so
// this is the count of integers below S with that bit clear.
JSK_HD int ZerosAtLevel(int S, int levels, int level) {
  const int bit = levels - 1 - level;
  const int64_t half = int64_t(1) << bit, rest = int64_t(S) & (2 * half - 1);
  const int64_t ones = (int64_t(S) >> (bit + 1)) * half + (rest > half ? rest - half : 0);
  return int(S - ones);
}

// Ones among entries [0, x) of a level.
JSK_HD int OnesBefore(const RankWord* level_words, int x) {
  const RankWord w = level_words[x >> 5];
  return int(w.ones_before) + PopCount(w.bits & ((1u << (x & 31)) - 1u));
}

// The structures of one row (read-only views into the workspace).
struct RowStructures {
  int S, levels;
  const float* sorted_scores;  // [S]
  const int32_t* key_at_rank;  // [S]
  const RankWord* words;       // [levels][WordsPerLevel(S)]
  const double* zero_sums;     // [levels][S + 1]

  JSK_HD const RankWord* level_words(int l) const { return words + int64_t(l) * WordsPerLevel(S); }
  JSK_HD const double* level_zero_sums(int l) const { return zero_sums + int64_t(l) * (S + 1); }
};

// The m-th smallest (from 0) rank among keys [0, n); requires m < n.
JSK_HD int SmallestRank(const RowStructures& row, int n, int m) {
  int lo = 0, hi = n, rank = 0;  // the range of X_l holding the node's part of keys [0, n)
  for (int l = 0; l < row.levels; ++l) {
    const RankWord* words = row.level_words(l);
    const int ones_lo = OnesBefore(words, lo), ones_hi = OnesBefore(words, hi);
    const int zeros = (hi - ones_hi) - (lo - ones_lo);
    rank <<= 1;
    if (m < zeros) {
      lo -= ones_lo;
      hi -= ones_hi;
    } else {
      m -= zeros;
      const int level_zeros = ZerosAtLevel(row.S, row.levels, l);
      lo = level_zeros + ones_lo;
      hi = level_zeros + ones_hi;
      rank |= 1;
    }
  }
  return rank;
}

// Count and score sum of the keys in [0, n) whose rank is below r (r <= S).
struct CountSum {
  int count;
  double sum;
};
// One level of the descent toward rank r through keys [0, n): the part of the keys still
// followed ([lo, hi) of X_l), and the count and score sum of those already known below r.
struct Descent {
  int lo, hi;
  CountSum below;
};
JSK_HD void DescendToward(const RowStructures& row, int l, int r, Descent* d) {
  const RankWord* words = row.level_words(l);
  const int ones_lo = OnesBefore(words, d->lo), ones_hi = OnesBefore(words, d->hi);
  const int zeros_lo = d->lo - ones_lo, zeros_hi = d->hi - ones_hi;
  if ((r >> (row.levels - 1 - l)) & 1) {
    // The zeros share r's higher bits and are below it here: take them, follow the ones.
    const double* sums = row.level_zero_sums(l);
    d->below.count += zeros_hi - zeros_lo;
    d->below.sum += sums[zeros_hi] - sums[zeros_lo];
    const int level_zeros = ZerosAtLevel(row.S, row.levels, l);
    d->lo = level_zeros + ones_lo;
    d->hi = level_zeros + ones_hi;
  } else {
    d->lo = zeros_lo;
    d->hi = zeros_hi;
  }
}
// Count and score sum of the keys in [0, n) whose rank is below r1, and the same for r2: the
// two descents in lockstep so that their loads overlap (the GPU pass waits on these dependent
// loads). A descent whose range is empty adds nothing more, exactly.
JSK_HD void RanksBelowPair(const RowStructures& row, int n, int r1, int r2, CountSum* below1,
                           CountSum* below2) {
  Descent a{0, n, {0, 0.0}}, b{0, n, {0, 0.0}};
  for (int l = 0; l < row.levels && (a.lo < a.hi || b.lo < b.hi); ++l) {
    DescendToward(row, l, r1, &a);
    DescendToward(row, l, r2, &b);
  }
  *below1 = a.below;
  *below2 = b.below;
}

// ---- prefix sums: rows whose queries have nearly the same candidates -------------------------
// below_count[r] / below_sum[r]: count and score sum of the keys j < n_base of ranks < r,
// r <= S (S + 1 entries each, built by one scan of the sorted order). A query with n
// candidates, n_base <= n <= n_base + kMaxPrefixExtras, adds the keys [n_base, n).
constexpr int kMaxPrefixExtras = 64;

// Whether a row's T queries take the prefix sums, and their n_base (query 0's candidates; the
// candidate counts never decrease along the queries).
JSK_HD int PrefixBase(int T, int S, int window, bool causal) {
  return NumCandidates(0, T, S, window, causal);
}
JSK_HD bool UsesPrefixSums(int T, int S, int window, bool causal) {
  return NumCandidates(T - 1, T, S, window, causal) - PrefixBase(T, S, window, causal) <=
         kMaxPrefixExtras;
}

struct PrefixRow {
  int S, n_base;
  const float* sorted_scores;  // [S]
  const int32_t* key_at_rank;  // [S]
  const int32_t* rank_of;      // [S]
  const int32_t* below_count;  // [S + 1]
  const double* below_sum;     // [S + 1]
};

// Count and score sum of the keys in [0, n) whose rank is below r (n >= n_base); CountBelow
// the count alone (the sum's loads drop out when inlined).
JSK_HD CountSum RanksBelow(const PrefixRow& row, int n, int r) {
  CountSum out{row.below_count[r], row.below_sum[r]};
  for (int j = row.n_base; j < n; ++j) {
    const int rank = row.rank_of[j];
    if (rank < r) {
      ++out.count;
      out.sum += row.sorted_scores[rank];
    }
  }
  return out;
}
JSK_HD int CountBelow(const PrefixRow& row, int n, int r) { return RanksBelow(row, n, r).count; }
JSK_HD void RanksBelowPair(const PrefixRow& row, int n, int r1, int r2, CountSum* below1,
                           CountSum* below2) {
  *below1 = RanksBelow(row, n, r1);
  *below2 = RanksBelow(row, n, r2);
}
// The m-th smallest (from 0) rank among keys [0, n): the smallest r with m + 1 of them at or
// below it, by bisection on the counts.
JSK_HD int SmallestRank(const PrefixRow& row, int n, int m) {
  int lo = 0, hi = row.S - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (CountBelow(row, n, mid + 1) > m) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// ---- building one level ---------------------------------------------------------------------
// Level l under construction: reads X_l (`ranks`), writes X_{l+1} (`next_ranks`, null for the
// last level, whose successor nobody reads), the words and the zero sums. The builder walks X_l
// in order with two running prefixes (ones before entry x, score sum of the zeros before x) and
// hands each entry and each word to the functions below.
struct LevelBuild {
  int S, levels, level;
  const int32_t* ranks;
  int32_t* next_ranks;
  RankWord* words;
  double* zero_sums;

  JSK_HD int bit() const { return levels - 1 - level; }
  JSK_HD bool is_one(int rank) const { return (rank >> bit()) & 1; }
};

// Entry x of X_l (rank `rank`), with `ones_before` ones and `zero_sum_before` zero score sum
// before it: its place in X_{l+1} and, for a zero, the zero prefix sum at that place.
JSK_HD void PlaceEntry(const LevelBuild& b, int x, int rank, int ones_before,
                       double zero_sum_before) {
  if (b.is_one(rank)) {
    if (b.next_ranks) b.next_ranks[ZerosAtLevel(b.S, b.levels, b.level) + ones_before] = rank;
  } else {
    const int place = x - ones_before;
    if (b.next_ranks) b.next_ranks[place] = rank;
    b.zero_sums[place] = zero_sum_before;
  }
}

// Word w (entries [32w, 32w + 32), bit i set when entry 32w + i is a one).
JSK_HD void StoreWord(const LevelBuild& b, int w, int ones_before, uint32_t bits) {
  b.words[w] = RankWord{uint32_t(ones_before), bits};
}

// After every entry: the zero sum at the end of the zeros and, when 32 divides S, the sentinel
// word that OnesBefore(S) reads.
JSK_HD void FinishLevel(const LevelBuild& b, int total_ones, double total_zero_sum) {
  b.zero_sums[ZerosAtLevel(b.S, b.levels, b.level)] = total_zero_sum;
  if (b.S % 32 == 0) StoreWord(b, b.S / 32, total_ones, 0u);
}

// ---- tau --------------------------------------------------------------------------------------
// f is continuous, nonincreasing, and linear between consecutive breakpoints {u_j, u_j - 1}.
// The breakpoints of every key (candidate or not) bound the piece, which only splits the
// candidates' pieces further. On the piece around t: f(s) = intercept - slope * s with
// slope = |M| and intercept = A + sum_M u_j, where M = {candidates t < u_j <= t + 1} and
// A = #{candidates u_j > t + 1} (the keys at u = t + 1 count in M, right of t they are inside).
struct LinearPiece {
  double t, f;
  double intercept;
  int slope;
  double begin, end;  // breakpoints around t: the line is f on [begin, end]
};

// #{r : sorted[r] <= x} and #{r : sorted[r] <= y}, compared in double: two branch-free binary
// searches in lockstep (the count grows by each power of two that keeps it valid).
JSK_HD void CountAtMostPair(const float* sorted, int S, double x, double y, int* count_x,
                            int* count_y) {
  int step = 1;
  while (2 * step <= S) step *= 2;
  int cx = 0, cy = 0;
  for (; step > 0; step >>= 1) {
    if (cx + step <= S && double(sorted[cx + step - 1]) <= x) cx += step;
    if (cy + step <= S && double(sorted[cy + step - 1]) <= y) cy += step;
  }
  *count_x = cx;
  *count_y = cy;
}

// Row: RowStructures (wavelet) or PrefixRow; both give RanksBelowPair and SmallestRank.
template <typename Row>
JSK_HD LinearPiece PieceAt(const Row& row, int n, double t) {
  const float* su = row.sorted_scores;
  // Ranks < below: u <= t, contribute 0; ranks >= inside_end: u > t + 1, contribute 1.
  int below, inside_end;
  CountAtMostPair(su, row.S, t, t + 1.0, &below, &inside_end);
  CountSum lower, upper;
  RanksBelowPair(row, n, below, inside_end, &lower, &upper);
  LinearPiece p;
  p.t = t;
  p.slope = upper.count - lower.count;
  // An empty M sums to exactly 0 (the two descents may round differently).
  const double inside_sum = p.slope > 0 ? upper.sum - lower.sum : 0.0;
  p.intercept = double(n - upper.count) + inside_sum;
  p.f = p.intercept - t * p.slope;
  const double inf = INFINITY;
  p.begin = fmax(below > 0 ? double(su[below - 1]) : -inf,
                 inside_end > 0 ? double(su[inside_end - 1]) - 1.0 : -inf);
  p.end = fmin(below < row.S ? double(su[below]) : inf,
               inside_end < row.S ? double(su[inside_end]) - 1.0 : inf);
  return p;
}

constexpr int kMaxTauSteps = 64;

// tau for n > k candidates whose k-th largest score is theta. The root lies in [theta - 1,
// theta): f(theta - 1) >= k (the top k count 1 each) and f(theta) < k (fewer than k candidates
// are above theta). Safeguarded Newton on that bracket [lo, hi]: from the last evaluated point,
// the root of its piece's line. When that root (clamped to the bracket, against rounding) lies
// on the piece, it is f's root, and the largest one: f is flat at level k only on a piece that
// ends at theta - 1, followed by the piece of slope >= 1 holding the keys at theta. Else the
// bracket shrinks at the Newton point when it is inside and the step at most half the one before
// last, at the midpoint otherwise.
template <typename Row>
JSK_HD double SolveTau(const Row& row, int n, int k, double theta) {
  double lo = theta - 1.0, hi = theta;
  LinearPiece p = PieceAt(row, n, lo);
  double step = INFINITY, step_before = INFINITY;
  for (int s = 0; s < kMaxTauSteps; ++s) {
    double next = 0.5 * (lo + hi);
    if (p.slope > 0) {
      const double root = (p.intercept - k) / p.slope;
      const double clamped = fmin(fmax(root, lo), hi);
      if (clamped >= p.begin && clamped <= p.end) return clamped;
      if (root > lo && root < hi && fabs(root - p.t) <= 0.5 * step_before) next = root;
    }
    step_before = step;
    step = fabs(next - p.t);
    p = PieceAt(row, n, next);
    if (p.f >= k) {
      lo = next;
    } else {
      hi = next;
    }
  }
  return lo;  // not reached on finite scores: the bracket holds a single piece long before
}

// kth and tau of a query with n candidates (the CPU contract: -1 and -inf when n <= k).
struct QuerySelectResult {
  int kth;
  float tau;
};
template <typename Row>
JSK_HD QuerySelectResult SelectQuery(const Row& row, int n, int k) {
  if (n <= k) return {-1, -INFINITY};
  const int rank = SmallestRank(row, n, n - k);
  return {row.key_at_rank[rank], float(SolveTau(row, n, k, double(row.sorted_scores[rank])))};
}

// ---- tile lists -------------------------------------------------------------------------------
// Queries per tile of the key lists: the forward's query tile (fwd_gather.cu); the backward's
// 64-query CTAs each serve half of a list. Python reads it from the extension.
constexpr int kTileQueries = 128;

// The list of a tile of queries [first, last] of a row: keys j < num_keys (the last query's
// candidate count) with rank_of[j] >= min_rank, the rank of the first query's kth (0, i.e.
// every key, when that kth is -1). Causal: the first query's selection (k keys) plus at most
// one new candidate per further query; rank_of is only read when first_kth >= 0.
struct TileListSpec {
  int num_keys;
  int min_rank;
};
JSK_HD TileListSpec TileList(int last, int T, int S, int window, bool causal, int first_kth,
                             const int32_t* rank_of) {
  return {NumCandidates(last, T, S, window, causal), first_kth >= 0 ? rank_of[first_kth] : 0};
}

}  // namespace jax_sparsek::cuda::sparsek
