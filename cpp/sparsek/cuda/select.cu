// SparseK selection on the GPU (SPEC.md section 4): scores -> tau and kth per query, the
// contract of jax_sparsek_sparsek_select (sparsek_ffi.cc) that select_cpu.cc computes with one
// sequential scan per (batch, kv head) row, and the tile lists of sparsek_kernels.h.
// Here every query is answered on its own from structures built once per row
// (select_algo.cuh), in four steps on each chunk of rows:
//   1. sort: each row's scores ascending, ties by key index (radix sorts of order-preserving
//      keys, stable with the keys in index order: one CTA per row in shared memory up to
//      kBlockSortKeys keys, CUB's segmented sort beyond);
//   2. build: one CTA per row builds the wavelet matrix over the ranks, level by level; or,
//      when the queries of a row have nearly the same candidates (at most kMaxPrefixExtras
//      apart: up to 65 causal queries, e.g. decoding, or any non-causal ones), one scan of the
//      sorted order gives the count and score sum below each rank (PrefixRow), far cheaper to
//      build than the levels for a few queries over a long row;
//   3. queries: one thread per (row, query): kth by a wavelet descent (or bisection on the
//      prefix counts), tau by safeguarded Newton on f's pieces;
//   4. tile lists: warps per (row, tile of kTileQueries queries) compact the listed keys in
//      ascending order with ballots (deterministic, no atomics); one warp per list when there
//      are many lists, up to 8 splitting a long row when there are few.
// Chunks bound the workspace (kChunkBudgetBytes) whatever the batch and head count. When
// S <= k_select no query has more than k candidates: steps 1-2 are skipped and the workspace is
// empty.
#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>

#include "sparsek/cuda/select_algo.cuh"
#include "sparsek/cuda/sparsek_kernels.h"

namespace jax_sparsek::cuda::sparsek {
namespace {

constexpr size_t kChunkBudgetBytes = size_t(256) << 20;  // row buffers of one chunk
// CUB's temporary storage: with DoubleBuffers the segmented radix sort needs only a few bytes
// of alignment slack; the launcher checks the real size against this.
constexpr size_t kSortTempReserve = size_t(64) << 10;

// ---- workspace --------------------------------------------------------------------------------
// Buffers of one chunk of `rows` rows, each [rows][...] with one row after the other.
struct Workspace {
  int32_t* segment_offsets;  // [rows + 1]: row r's sort segment is [r * S, (r + 1) * S)
  uint32_t* sort_keys[2];    // [rows][S]: CUB DoubleBuffer of the sort keys
  int32_t* sort_values[2];   // [rows][S]: the key indices; afterwards the build's X_l ping-pong
  float* sorted_scores;      // [rows][S]
  int32_t* key_at_rank;      // [rows][S]
  RankWord* words;           // [rows][levels][WordsPerLevel(S)]   (wavelet matrix)
  double* zero_sums;         // [rows][levels][S + 1]
  int32_t* below_count;      // [rows][S + 1]                      (or prefix sums)
  double* below_sum;         // [rows][S + 1]
  void* sort_temp;           // kSortTempReserve bytes
  size_t bytes;
};

Workspace CarveWorkspace(int S, int rows, bool prefix, void* base) {
  size_t offset = 0;
  auto take = [&](size_t bytes) -> void* {
    void* at = base ? static_cast<uint8_t*>(base) + offset : nullptr;
    offset += (bytes + 255) / 256 * 256;
    return at;
  };
  const size_t items = size_t(rows) * S, levels = size_t(WaveletLevels(S));
  Workspace w;
  w.segment_offsets = static_cast<int32_t*>(take((size_t(rows) + 1) * sizeof(int32_t)));
  for (int i = 0; i < 2; ++i) {
    w.sort_keys[i] = static_cast<uint32_t*>(take(items * sizeof(uint32_t)));
    w.sort_values[i] = static_cast<int32_t*>(take(items * sizeof(int32_t)));
  }
  w.sorted_scores = static_cast<float*>(take(items * sizeof(float)));
  w.key_at_rank = static_cast<int32_t*>(take(items * sizeof(int32_t)));
  const size_t level_rows = prefix ? 0 : size_t(rows) * levels;
  w.words = static_cast<RankWord*>(take(level_rows * WordsPerLevel(S) * sizeof(RankWord)));
  w.zero_sums = static_cast<double*>(take(level_rows * (size_t(S) + 1) * sizeof(double)));
  const size_t prefix_items = prefix ? size_t(rows) * (size_t(S) + 1) : 0;
  w.below_count = static_cast<int32_t*>(take(prefix_items * sizeof(int32_t)));
  w.below_sum = static_cast<double*>(take(prefix_items * sizeof(double)));
  w.sort_temp = take(kSortTempReserve);
  w.bytes = offset;
  return w;
}

// Structures are needed iff some query can have more than k_select candidates.
bool NeedsStructures(const SparsekDims& d) { return d.S > d.k_select; }

// Prefix sums instead of the wavelet matrix (select_algo.cuh).
bool RowsUsePrefixSums(const SparsekDims& d) {
  return UsesPrefixSums(d.T, d.S, d.window, d.causal);
}

// Rows per chunk: as many as fit the budget (at least one), balanced over the chunks; a chunk's
// items must be indexable by int (CUB's offsets), and its rows / 32 fit the sort input's
// gridDim.y.
int ChunkRows(const SparsekDims& d) {
  const int64_t rows = std::max<int64_t>(1, int64_t(d.B) * d.K);
  int64_t fit = 65535;
  if (NeedsStructures(d)) {
    // The bytes CarveWorkspace adds per row.
    const bool prefix = RowsUsePrefixSums(d);
    const int64_t row_bytes = int64_t(CarveWorkspace(d.S, 2, prefix, nullptr).bytes -
                                      CarveWorkspace(d.S, 1, prefix, nullptr).bytes);
    fit = std::max<int64_t>(1, std::min<int64_t>({fit, int64_t(kChunkBudgetBytes) / row_bytes,
                                                  INT_MAX / d.S - 1}));
  }
  const int64_t chunks = (rows + fit - 1) / fit;
  return int((rows + chunks - 1) / chunks);
}

// ---- 1. sort ----------------------------------------------------------------------------------
// Sort input of rows [row0, row0 + rows): the scores' sort keys and the key indices, row after
// row. A 32 x 32 tile through shared memory keeps both the [B, S, K] reads (a batch's rows are
// adjacent kv heads) and the row-major writes coalesced. Block (32, 8).
__global__ void __launch_bounds__(256)
    sort_input_kernel(const float* scores, int S, int K, int64_t row0, int rows, uint32_t* keys,
                      int32_t* key_index, int32_t* segment_offsets) {
  __shared__ uint32_t tile[32][33];
  const int j0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int dj = ty; dj < 32; dj += 8) {
    const int j = j0 + dj, r = r0 + tx;
    if (j < S && r < rows) {
      const int64_t row = row0 + r, b = row / K, h = row % K;
      tile[dj][tx] = SortKeyOfScore(__float_as_uint(scores[(b * S + j) * K + h]));
    }
  }
  __syncthreads();
  for (int dr = ty; dr < 32; dr += 8) {
    const int r = r0 + dr, j = j0 + tx;
    if (j < S && r < rows) {
      keys[int64_t(r) * S + j] = tile[tx][dr];
      key_index[int64_t(r) * S + j] = j;
    }
  }
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    for (int r = ty * 32 + tx; r <= rows; r += 256) segment_offsets[r] = r * S;
  }
}

// Sorted keys back to scores, and both rank <-> key maps.
__global__ void __launch_bounds__(256)
    unpack_sorted_kernel(const uint32_t* keys, const int32_t* key_index, int S, int items,
                         float* sorted_scores, int32_t* key_at_rank, int32_t* rank_of) {
  const int x = blockIdx.x * 256 + threadIdx.x;
  if (x >= items) return;
  const int j = key_index[x], rank = x % S;
  sorted_scores[x] = __uint_as_float(ScoreOfSortKey(keys[x]));
  key_at_rank[x] = j;
  rank_of[x - rank + j] = rank;
}

// Rows of at most kBlockSortKeys keys instead: one CTA per row sorts them in shared memory and
// writes the three maps itself (one launch in place of the three above and CUB's passes over
// global memory). Past S the keys are the largest sort key with larger indices, so the stable
// sort leaves them after every real key.
constexpr int kBlockSortThreads = 512, kBlockSortItems = 8;
constexpr int kBlockSortKeys = kBlockSortThreads * kBlockSortItems;

__global__ void __launch_bounds__(kBlockSortThreads)
    block_sort_rows_kernel(const float* scores, int S, int K, int64_t row0, float* sorted_scores,
                           int32_t* key_at_rank, int32_t* rank_of) {
  using BlockSort = cub::BlockRadixSort<uint32_t, kBlockSortThreads, kBlockSortItems, int32_t>;
  __shared__ typename BlockSort::TempStorage temp;
  const int64_t row = blockIdx.x, b = (row0 + row) / K, h = (row0 + row) % K;
  uint32_t keys[kBlockSortItems];
  int32_t index[kBlockSortItems];
#pragma unroll
  for (int i = 0; i < kBlockSortItems; ++i) {  // blocked: thread t holds keys [8t, 8t + 8)
    const int j = threadIdx.x * kBlockSortItems + i;
    keys[i] = j < S ? SortKeyOfScore(__float_as_uint(scores[(b * S + j) * K + h])) : ~0u;
    index[i] = j;
  }
  BlockSort(temp).SortBlockedToStriped(keys, index);
#pragma unroll
  for (int i = 0; i < kBlockSortItems; ++i) {  // striped: rank threadIdx.x + 512 i
    const int rank = i * kBlockSortThreads + threadIdx.x;
    if (rank < S) {
      sorted_scores[row * S + rank] = __uint_as_float(ScoreOfSortKey(keys[i]));
      key_at_rank[row * S + rank] = index[i];
      rank_of[row * S + index[i]] = rank;
    }
  }
}

// ---- block scans --------------------------------------------------------------------------------
// Inclusive sum of x over the lanes up to this one.
__device__ __forceinline__ double WarpInclusiveSum(double x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const double other = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += other;
  }
  return x;
}

// The two builds below scan a row in tiles of a block's threads: (count, score sum) per warp,
// then per warp the totals before it (added to *count_before / *sum_before, which hold the
// previous tiles' totals on entry) and the tile's totals. Every thread of the block (kWarps
// warps) calls this with its warp's totals (the same in every lane).
template <int kWarps>
__device__ __forceinline__ void ScanWarpTotals(int warp_count, double warp_sum, int* count_before,
                                               double* sum_before, int* tile_count,
                                               double* tile_sum) {
  __shared__ int counts[kWarps];
  __shared__ double sums[kWarps];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    counts[warp] = warp_count;
    sums[warp] = warp_sum;
  }
  __syncthreads();
  *tile_count = 0;
  *tile_sum = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) {
      *count_before += counts[w];
      *sum_before += sums[w];
    }
    *tile_count += counts[w];
    *tile_sum += sums[w];
  }
  __syncthreads();  // the totals are read before the next tile writes them
}

// ---- 2. wavelet matrix --------------------------------------------------------------------------
constexpr int kBuildWarps = 16, kBuildThreads = kBuildWarps * 32;
constexpr int kBuildWordsPerWarp = 4;  // consecutive 32-entry words of X_l per warp and tile
constexpr int kBuildTile = kBuildThreads * kBuildWordsPerWarp;

struct BuildParams {
  int S, levels;
  const float* sorted_scores;  // [rows][S]
  const int32_t* rank_of;      // [rows][S]: X_0
  int32_t* scratch[2];         // [rows][S] each: X_1, X_2, ... alternately
  RankWord* words;
  double* zero_sums;
};

// One CTA per row. Per level, tiles of kBuildTile entries of X_l: each warp takes its words in
// order, forms them with ballots and scans the zeros' scores with shuffles; the warps' totals
// then give every entry its two prefixes (ones before it, zero score sum before it), and
// PlaceEntry / StoreWord write it. A level's X_{l+1} is complete before the next level starts.
__global__ void __launch_bounds__(kBuildThreads, 2) build_wavelet_kernel(const BuildParams p) {
  const int S = p.S, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t lanes_below = (1u << lane) - 1u;
  const int64_t row = blockIdx.x;
  const float* su = p.sorted_scores + row * S;
  int32_t* const scratch[2] = {p.scratch[0] + row * S, p.scratch[1] + row * S};
  for (int level = 0; level < p.levels; ++level) {
    // Level l reads X_l from scratch[(l - 1) % 2] and writes X_{l+1} to scratch[l % 2].
    const bool odd = level & 1;
    const LevelBuild b{S,
                       p.levels,
                       level,
                       level == 0 ? p.rank_of + row * S : (odd ? scratch[0] : scratch[1]),
                       level + 1 < p.levels ? (odd ? scratch[1] : scratch[0]) : nullptr,
                       p.words + (row * p.levels + level) * WordsPerLevel(S),
                       p.zero_sums + (row * p.levels + level) * (S + 1)};
    int ones_carry = 0;  // over the level's previous tiles (every thread holds the same value)
    double zero_sum_carry = 0.0;
    for (int tile = 0; tile < S; tile += kBuildTile) {
      const int warp_first = tile + warp * 32 * kBuildWordsPerWarp;
      int rank[kBuildWordsPerWarp];
#pragma unroll
      for (int w = 0; w < kBuildWordsPerWarp; ++w) {
        const int x = warp_first + w * 32 + lane;
        rank[w] = x < S ? b.ranks[x] : 0;
      }
      // Prefixes within the warp: ones before each word, zero score sum before each entry.
      uint32_t bits[kBuildWordsPerWarp];
      int ones_before_word[kBuildWordsPerWarp];
      double zero_sum_before[kBuildWordsPerWarp];
      int warp_ones_total = 0;
      double warp_zero_total = 0.0;
#pragma unroll
      for (int w = 0; w < kBuildWordsPerWarp; ++w) {
        const int x = warp_first + w * 32 + lane;
        const bool one = x < S && b.is_one(rank[w]);
        bits[w] = __ballot_sync(0xffffffffu, one);
        const double inclusive = WarpInclusiveSum(x < S && !one ? double(su[rank[w]]) : 0.0);
        const double exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
        zero_sum_before[w] = warp_zero_total + (lane > 0 ? exclusive : 0.0);
        ones_before_word[w] = warp_ones_total;
        warp_ones_total += __popc(bits[w]);
        warp_zero_total += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      int ones_offset = ones_carry, tile_ones;
      double zero_offset = zero_sum_carry, tile_zero_sum;
      ScanWarpTotals<kBuildWarps>(warp_ones_total, warp_zero_total, &ones_offset, &zero_offset,
                                  &tile_ones, &tile_zero_sum);
#pragma unroll
      for (int w = 0; w < kBuildWordsPerWarp; ++w) {
        const int x = warp_first + w * 32 + lane;
        if (x < S) {
          const int ones_before_entry = ones_before_word[w] + __popc(bits[w] & lanes_below);
          PlaceEntry(b, x, rank[w], ones_offset + ones_before_entry,
                     zero_offset + zero_sum_before[w]);
          if (lane == 0) StoreWord(b, x / 32, ones_offset + ones_before_word[w], bits[w]);
        }
      }
      ones_carry += tile_ones;
      zero_sum_carry += tile_zero_sum;
    }
    if (threadIdx.x == 0) FinishLevel(b, ones_carry, zero_sum_carry);
    __syncthreads();  // X_{l+1} is written before the next level reads it
  }
}

// ---- 2'. prefix sums ----------------------------------------------------------------------------
constexpr int kPrefixWarps = 16, kPrefixThreads = kPrefixWarps * 32;

// One CTA per row: below_count[r] / below_sum[r] over the ranks < r of the keys j < n_base,
// by block scans of kPrefixThreads ranks at a time (counts by ballots, sums by shuffles).
__global__ void __launch_bounds__(kPrefixThreads)
    prefix_sums_kernel(int S, int n_base, const float* sorted_scores, const int32_t* key_at_rank,
                       int32_t* below_count, double* below_sum) {
  const int lane = threadIdx.x % 32;
  const uint32_t lanes_upto = (2u << lane) - 1u;  // lanes <= this one (all of them for lane 31)
  const int64_t row = blockIdx.x;
  const float* su = sorted_scores + row * S;
  const int32_t* keys = key_at_rank + row * S;
  int32_t* count_out = below_count + row * (S + 1);
  double* sum_out = below_sum + row * (S + 1);
  if (threadIdx.x == 0) {
    count_out[0] = 0;
    sum_out[0] = 0.0;
  }
  int count_carry = 0;
  double sum_carry = 0.0;
  for (int base = 0; base < S; base += kPrefixThreads) {
    const int r = base + threadIdx.x;
    const bool in = r < S && keys[r] < n_base;
    const uint32_t ballot = __ballot_sync(0xffffffffu, in);
    const double sum = WarpInclusiveSum(in ? double(su[r]) : 0.0);
    int count_before = count_carry, tile_count;
    double sum_before = sum_carry, tile_sum;
    ScanWarpTotals<kPrefixWarps>(__popc(ballot), __shfl_sync(0xffffffffu, sum, 31), &count_before,
                                 &sum_before, &tile_count, &tile_sum);
    if (r < S) {
      count_out[r + 1] = count_before + __popc(ballot & lanes_upto);
      sum_out[r + 1] = sum_before + sum;
    }
    count_carry += tile_count;
    sum_carry += tile_sum;
  }
}

// rank_of: the chunk's rows of the key_rank output ([rows][S]).
cudaError_t BuildRowStructures(const SparsekDims& d, const float* scores, int64_t row0, int rows,
                               const Workspace& w, int32_t* rank_of, cudaStream_t stream,
                               std::string* error) {
  const int S = d.S, items = rows * S;
  cudaError_t err = cudaSuccess;
  if (S <= kBlockSortKeys) {
    block_sort_rows_kernel<<<rows, kBlockSortThreads, 0, stream>>>(
        scores, S, d.K, row0, w.sorted_scores, w.key_at_rank, rank_of);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  } else {
    sort_input_kernel<<<dim3((S + 31) / 32, (rows + 31) / 32), dim3(32, 8), 0, stream>>>(
        scores, S, d.K, row0, rows, w.sort_keys[0], w.sort_values[0], w.segment_offsets);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    cub::DoubleBuffer<uint32_t> keys(w.sort_keys[0], w.sort_keys[1]);
    cub::DoubleBuffer<int32_t> values(w.sort_values[0], w.sort_values[1]);
    size_t temp_bytes = 0;
    err = cub::DeviceSegmentedRadixSort::SortPairs(nullptr, temp_bytes, keys, values, items, rows,
                                                   w.segment_offsets, w.segment_offsets + 1, 0,
                                                   32, stream);
    if (err != cudaSuccess) return err;
    if (temp_bytes > kSortTempReserve) {
      *error = "the segmented sort needs " + std::to_string(temp_bytes) +
               " bytes of temporary storage, the workspace reserves " +
               std::to_string(kSortTempReserve);
      return cudaErrorInvalidValue;
    }
    err = cub::DeviceSegmentedRadixSort::SortPairs(w.sort_temp, temp_bytes, keys, values, items,
                                                   rows, w.segment_offsets,
                                                   w.segment_offsets + 1, 0, 32, stream);
    if (err != cudaSuccess) return err;

    unpack_sorted_kernel<<<(items + 255) / 256, 256, 0, stream>>>(
        keys.Current(), values.Current(), S, items, w.sorted_scores, w.key_at_rank, rank_of);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  if (RowsUsePrefixSums(d)) {
    prefix_sums_kernel<<<rows, kPrefixThreads, 0, stream>>>(
        S, PrefixBase(d.T, d.S, d.window, d.causal), w.sorted_scores, w.key_at_rank,
        w.below_count, w.below_sum);
    return cudaGetLastError();
  }
  // The sort buffers are free again: the values' pair holds the levels' sequences.
  const BuildParams p{S, WaveletLevels(S), w.sorted_scores, rank_of,
                      {w.sort_values[0], w.sort_values[1]}, w.words, w.zero_sums};
  build_wavelet_kernel<<<rows, kBuildThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- 3. queries ---------------------------------------------------------------------------------
constexpr int kQueryThreads = 128;

struct QueryParams {
  int T, S, levels, k_select, window;
  bool causal;
  int64_t row0, queries;  // queries = rows * T of the chunk
  const float* sorted_scores;
  const int32_t* key_at_rank;
  const RankWord* words;        // the wavelet matrix
  const double* zero_sums;
  bool uses_prefix_sums;        // instead, the prefix sums:
  int n_base;
  const int32_t* rank_of;       // [rows][S] of the chunk
  const int32_t* below_count;
  const double* below_sum;
  float* tau;    // [B*K, T]
  int32_t* kth;  // [B*K, T]
};

// One thread per (row, query) of the chunk, queries of a row adjacent.
__global__ void __launch_bounds__(kQueryThreads) select_queries_kernel(const QueryParams p) {
  const int64_t x = int64_t(blockIdx.x) * kQueryThreads + threadIdx.x;
  if (x >= p.queries) return;
  const int64_t row = x / p.T;
  const int i = int(x % p.T);
  const int n = NumCandidates(i, p.T, p.S, p.window, p.causal);
  QuerySelectResult r{-1, -INFINITY};
  // With n <= k_select the structures may not exist (S <= k_select).
  if (n > p.k_select && p.uses_prefix_sums) {
    const PrefixRow pr{p.S,
                       p.n_base,
                       p.sorted_scores + row * p.S,
                       p.key_at_rank + row * p.S,
                       p.rank_of + row * p.S,
                       p.below_count + row * (p.S + 1),
                       p.below_sum + row * (p.S + 1)};
    r = SelectQuery(pr, n, p.k_select);
  } else if (n > p.k_select) {
    const int64_t levels = p.levels;
    const RowStructures rs{p.S,
                           p.levels,
                           p.sorted_scores + row * p.S,
                           p.key_at_rank + row * p.S,
                           p.words + row * levels * WordsPerLevel(p.S),
                           p.zero_sums + row * levels * (p.S + 1)};
    r = SelectQuery(rs, n, p.k_select);
  }
  const int64_t out = p.row0 * p.T + x;
  p.tau[out] = r.tau;
  p.kth[out] = r.kth;
}

// ---- 4. tile lists ------------------------------------------------------------------------------
constexpr int kListWarps = 8;
constexpr int kListWordsPerStep = 4;  // 32-key words each warp loads before compacting them

struct ListParams {
  int T, S, window;
  bool causal;
  int num_tiles, capacity;
  int warps_per_list;   // 1, 2, 4 or 8
  int64_t row0, lists;  // lists = rows * num_tiles of the chunk
  const int32_t* rank_of;  // [rows][S] of the chunk, null without structures
  const int32_t* kth;      // [B*K, T]
  int32_t* tile_keys;      // [B*K, num_tiles, capacity]
  int32_t* tile_count;     // [B*K, num_tiles]
};

// `warps_per_list` warps per (row, tile) of the chunk: keys in ascending order, each kept or not
// by the tile's threshold rank, placed by the ballot's prefix count. Several warps split the
// keys into runs: each counts its run's listed keys first and places them after the runs
// before it.
__global__ void __launch_bounds__(kListWarps * 32) tile_lists_kernel(const ListParams p) {
  __shared__ int run_counts[kListWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t lanes_below = (1u << lane) - 1u;
  const int64_t x = (int64_t(blockIdx.x) * kListWarps + warp) / p.warps_per_list;
  const int part = warp % p.warps_per_list;
  const bool valid = x < p.lists;  // no early return: the block synchronizes below
  const int64_t row = valid ? x / p.num_tiles : 0, list = p.row0 * p.num_tiles + x;
  const int first = int(x % p.num_tiles) * kTileQueries;
  const int last = min(first + kTileQueries, p.T) - 1;
  const int32_t* rank_of = p.rank_of ? p.rank_of + row * p.S : nullptr;
  const TileListSpec spec =
      valid ? TileList(last, p.T, p.S, p.window, p.causal, p.kth[(p.row0 + row) * p.T + first],
                       rank_of)
            : TileListSpec{0, 0};
  constexpr int kStep = 32 * kListWordsPerStep;
  const int run = (spec.num_keys + p.warps_per_list * kStep - 1) / (p.warps_per_list * kStep) * kStep;
  const int run_begin = part * run, run_end = min(run_begin + run, spec.num_keys);
  auto listed = [&](int j) {
    return j < run_end && (spec.min_rank == 0 || rank_of[j] >= spec.min_rank);
  };
  int count = 0;  // listed keys before this run's next one
  if (p.warps_per_list > 1) {
    int in_run = 0;
    for (int base = run_begin; base < run_end; base += kStep) {
#pragma unroll
      for (int w = 0; w < kListWordsPerStep; ++w) {
        in_run += __popc(__ballot_sync(0xffffffffu, listed(base + w * 32 + lane)));
      }
    }
    if (lane == 0) run_counts[warp] = in_run;
    __syncthreads();
    for (int w = warp - part; w < warp; ++w) count += run_counts[w];
  }
  if (!valid) return;
  int32_t* keys = p.tile_keys + list * p.capacity;
  for (int base = run_begin; base < run_end; base += kStep) {
    bool in[kListWordsPerStep];
#pragma unroll
    for (int w = 0; w < kListWordsPerStep; ++w) in[w] = listed(base + w * 32 + lane);
#pragma unroll
    for (int w = 0; w < kListWordsPerStep; ++w) {
      const uint32_t ballot = __ballot_sync(0xffffffffu, in[w]);
      const int slot = count + __popc(ballot & lanes_below);
      // count <= capacity holds by construction (see TileList); the check only keeps a broken
      // invariant from writing into the next list.
      if (in[w] && slot < p.capacity) keys[slot] = base + w * 32 + lane;
      count += __popc(ballot);
    }
  }
  if (part == p.warps_per_list - 1 && lane == 0) p.tile_count[list] = min(count, p.capacity);
}

// Warps per list: one when the lists alone give the GPU enough warps, up to 8 otherwise.
int WarpsPerList(int64_t lists) {
  constexpr int64_t kEnoughWarps = 4096;  // ~132 SMs x 32 resident warps of this small kernel
  int warps = 1;
  while (warps < kListWarps && lists * warps < kEnoughWarps) warps *= 2;
  return warps;
}

}  // namespace

size_t SelectWorkspaceBytes(const SparsekDims& d) {
  if (int64_t(d.B) * d.K * d.T == 0 || !NeedsStructures(d)) return 0;
  return CarveWorkspace(d.S, ChunkRows(d), RowsUsePrefixSums(d), nullptr).bytes;
}

cudaError_t LaunchSparsekSelect(const SelectArgs& a, cudaStream_t stream, std::string* error) {
  const SparsekDims& d = a.dims;
  const int64_t rows = int64_t(d.B) * d.K;
  if (rows * d.T == 0) return cudaSuccess;
  if (d.k_select < 1) {
    *error = "k_select must be >= 1, got " + std::to_string(d.k_select);
    return cudaErrorInvalidValue;
  }
  const bool structures = NeedsStructures(d);
  const int chunk_rows = ChunkRows(d);
  Workspace w{};
  if (structures) {
    w = CarveWorkspace(d.S, chunk_rows, RowsUsePrefixSums(d), a.workspace);
    if (a.workspace_bytes < w.bytes || reinterpret_cast<uintptr_t>(a.workspace) % 256 != 0) {
      *error = "workspace of " + std::to_string(a.workspace_bytes) + " bytes, need " +
               std::to_string(w.bytes) + " bytes aligned to 256";
      return cudaErrorInvalidValue;
    }
  }
  cudaError_t err = cudaSuccess;
  for (int64_t row0 = 0; row0 < rows; row0 += chunk_rows) {
    const int chunk = int(std::min<int64_t>(chunk_rows, rows - row0));
    int32_t* rank_of = structures ? a.key_rank + row0 * d.S : nullptr;
    if (structures) {
      err = BuildRowStructures(d, a.scores, row0, chunk, w, rank_of, stream, error);
      if (err != cudaSuccess) return err;
    }

    const QueryParams q{d.T, d.S, structures ? WaveletLevels(d.S) : 0, d.k_select, d.window,
                        d.causal, row0, int64_t(chunk) * d.T, w.sorted_scores, w.key_at_rank,
                        w.words, w.zero_sums, structures && RowsUsePrefixSums(d),
                        PrefixBase(d.T, d.S, d.window, d.causal), rank_of, w.below_count,
                        w.below_sum, a.tau, a.kth};
    select_queries_kernel<<<unsigned((q.queries + kQueryThreads - 1) / kQueryThreads),
                            kQueryThreads, 0, stream>>>(q);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    const int64_t lists = int64_t(chunk) * d.num_tiles();
    const ListParams l{d.T, d.S, d.window, d.causal, d.num_tiles(), d.list_capacity(),
                       WarpsPerList(lists), row0, lists, rank_of, a.kth, a.tile_keys, a.tile_count};
    tile_lists_kernel<<<unsigned((lists * l.warps_per_list + kListWarps - 1) / kListWarps),
                        kListWarps * 32, 0, stream>>>(l);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace jax_sparsek::cuda::sparsek
