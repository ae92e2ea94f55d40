// Tiled CPU attention (FlashAttention-2 forward and backward) shared by flash_attention and
// block_sparse_attention. The kernel is one template over the input storage type and a
// mask policy:
//   - KeyRange: which keys row i may see from causality and the window, an interval
//     [Lo(i), Hi(i)] whose ends never decrease with i (bottom-right aligned positions).
//   - DenseMask / BlockMask: how rows and keys are cut into tiles, and which tile pairs
//     exist at all. BlockMask never visits a key tile whose mask block is off.
// Inside a tile pair every row sees one contiguous column interval, so masking is a pair
// of bounds per row and never a [T, S] buffer. All arithmetic is float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/ffi_helpers.h"
#include "flash_attention/cpu_microkernels.h"

namespace jax_sparsek::flash {

constexpr int64_t kTileRows = 64;  // query rows per tile
constexpr int64_t kTileCols = 64;  // keys per tile (score tiles are always this wide)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t CeilDiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---- which keys a query row may see ------------------------------------------------
struct KeyRange {
  int64_t T, S;
  bool causal;
  int64_t left, right;  // window bounds, -1 = unbounded

  int64_t Position(int64_t i) const { return i + S - T; }
  // First visible key of row i (inclusive).
  int64_t Lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, Position(i) - left); }
  // Last visible key of row i (inclusive); Hi(i) < Lo(i) when the row sees nothing.
  int64_t Hi(int64_t i) const {
    int64_t hi = S - 1;
    if (causal) hi = std::min(hi, Position(i));
    if (right >= 0) hi = std::min(hi, Position(i) + right);
    return hi;
  }
  // The rows [first, last) whose interval meets keys [j0, j1). Lo and Hi never decrease,
  // so they form one range, found by two binary searches.
  std::pair<int64_t, int64_t> RowsSeeing(int64_t j0, int64_t j1) const {
    int64_t a = 0, b = T;  // first row with Hi >= j0
    while (a < b) { const int64_t mid = (a + b) / 2; if (Hi(mid) >= j0) b = mid; else a = mid + 1; }
    const int64_t first = a;
    b = T;  // first row with Lo > j1 - 1
    while (a < b) { const int64_t mid = (a + b) / 2; if (Lo(mid) > j1 - 1) b = mid; else a = mid + 1; }
    return {first, a};
  }
};

// Calls f(start, end) for consecutive chunks of at most `chunk` over [begin, end).
template <typename F>
inline void ForEachChunk(int64_t begin, int64_t end, int64_t chunk, F&& f) {
  for (int64_t s = begin; s < end; s += chunk) f(s, std::min(end, s + chunk));
}

// ---- tiling policies ---------------------------------------------------------------
// Forward: ForEachRowTile lists the query-row tiles; ForEachKeyTile(b, h, i0, i1) the key
// tiles that rows [i0, i1) of query head h visit. Backward: ForEachKeyTileOuter lists the
// key tiles; ForEachRowTileOfKeys(b, h, j0, j1) the row tiles of head h that see keys [j0, j1).

// Every key in [Lo(i), Hi(i)] is visible.
struct DenseMask {
  KeyRange range;

  template <typename F> void ForEachRowTile(F&& f) const { ForEachChunk(0, range.T, kTileRows, f); }
  template <typename F> void ForEachKeyTile(int64_t, int64_t, int64_t i0, int64_t i1, F&& f) const {
    ForEachChunk(range.Lo(i0), range.Hi(i1 - 1) + 1, kTileCols, f);
  }
  template <typename F> void ForEachKeyTileOuter(F&& f) const { ForEachChunk(0, range.S, kTileCols, f); }
  template <typename F> void ForEachRowTileOfKeys(int64_t, int64_t, int64_t j0, int64_t j1, F&& f) const {
    const auto rows = range.RowsSeeing(j0, j1);
    ForEachChunk(rows.first, rows.second, kTileRows, f);
  }
};

// Key j is visible to row i iff mask[b', h', i / bq, j / bk] (and j <= p_i when causal).
// Row tiles of the forward stay inside one mask block row, key tiles of the backward inside
// one mask block column, so the mask is constant over the other axis of a tile; runs of
// consecutive on-blocks are merged into full-width tiles.
struct BlockMask {
  KeyRange range;  // causal bound only
  const bool* mask;
  int64_t mask_batches, mask_heads, q_blocks, k_blocks, block_q, block_k;
  int64_t num_heads, num_kv_heads;

  // The mask row of (b, h, q block): mask heads are one per query head, per kv head, or shared.
  const bool* Row(int64_t b, int64_t h, int64_t qb) const {
    const int64_t mb = mask_batches == 1 ? 0 : b;
    const int64_t mh = mask_heads == num_heads ? h
                       : mask_heads == num_kv_heads ? h / (num_heads / num_kv_heads) : 0;
    return mask + ((mb * mask_heads + mh) * q_blocks + qb) * k_blocks;
  }

  template <typename F> void ForEachRowTile(F&& f) const {
    for (int64_t qb = 0; qb < q_blocks; ++qb)
      ForEachChunk(qb * block_q, std::min(range.T, (qb + 1) * block_q), kTileRows, f);
  }
  template <typename F> void ForEachKeyTile(int64_t b, int64_t h, int64_t i0, int64_t i1, F&& f) const {
    const bool* row = Row(b, h, i0 / block_q);
    const int64_t key_end = range.Hi(i1 - 1) + 1;  // no row of the tile sees a key past this
    for (int64_t kb = 0; kb < k_blocks && kb * block_k < key_end;) {
      if (!row[kb]) { ++kb; continue; }
      const int64_t first = kb;
      while (kb < k_blocks && row[kb]) ++kb;
      ForEachChunk(first * block_k, std::min(key_end, kb * block_k), kTileCols, f);
    }
  }
  template <typename F> void ForEachKeyTileOuter(F&& f) const {
    for (int64_t kb = 0; kb < k_blocks; ++kb)
      ForEachChunk(kb * block_k, std::min(range.S, (kb + 1) * block_k), kTileCols, f);
  }
  template <typename F> void ForEachRowTileOfKeys(int64_t b, int64_t h, int64_t j0, int64_t j1, F&& f) const {
    const int64_t kb = j0 / block_k;
    const auto rows = range.RowsSeeing(j0, j1);
    for (int64_t qb = rows.first / block_q; qb < q_blocks && qb * block_q < rows.second;) {
      if (!Row(b, h, qb)[kb]) { ++qb; continue; }
      const int64_t first = qb;
      while (qb < q_blocks && Row(b, h, qb)[kb]) ++qb;
      ForEachChunk(std::max(rows.first, first * block_q), std::min(rows.second, qb * block_q),
                   kTileRows, f);
    }
  }
};

// ---- tile loads (the only place that touches the input storage type) ----------------
// dst[r][c] = scale * src[r * stride + c] for r < rows, c < cols; zero up to [rows_pad][ld).
template <typename T>
void LoadRows(const T* src, int64_t stride, int64_t rows, int64_t cols, float scale, float* dst,
              int64_t rows_pad, int64_t ld) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* d = dst + r * ld;
    int64_t c = 0;
    if (r < rows) {
      const T* s = src + r * stride;
      for (; c < cols; ++c) d[c] = scale * ToFloat(s[c]);
    }
    for (; c < ld; ++c) d[c] = 0.0f;
  }
}

// dst[c][r] = scale * src[r * stride + c] for r < rows, c < cols; zero up to [cols_pad][ld).
template <typename T>
void LoadTransposed(const T* src, int64_t stride, int64_t rows, int64_t cols, float scale,
                    float* dst, int64_t cols_pad, int64_t ld) {
  for (int64_t c = 0; c < cols_pad; ++c)
    for (int64_t r = 0; r < ld; ++r) dst[c * ld + r] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = scale * ToFloat(s[c]);
  }
}

template <typename T>
void StoreRows(const float* src, int64_t ld, int64_t rows, int64_t cols, T* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * stride + c] = FromFloat<T>(src[r * ld + c]);
}

// dst[c][r] = src[r][c] for r < rows, c < cols (src rows kTileCols wide, dst rows kTileRows).
inline void TransposeTile(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * kTileRows + r] = src[r * kTileCols + c];
}

// Columns [lo, hi) of the tile starting at key j0 that row i sees (lo >= hi: none).
inline std::pair<int64_t, int64_t> VisibleColumns(const KeyRange& range, int64_t i, int64_t j0,
                                                  int64_t cols) {
  const int64_t lo = std::clamp<int64_t>(range.Lo(i) - j0, 0, cols);
  const int64_t hi = std::clamp<int64_t>(range.Hi(i) + 1 - j0, 0, cols);
  return {lo, hi};
}

// ---- problem description -----------------------------------------------------------
struct Dims {
  int64_t B, T, S, N, K, D, Dv;
  int64_t group() const { return N / K; }
};

template <typename T>
struct ForwardArgs {
  Dims dims;
  float scale;
  const T *q, *k, *v;
  T* o;
  float* lse;
};

template <typename T>
struct BackwardArgs {
  Dims dims;
  float scale;
  const T *q, *k, *v, *o, *dout;
  const float* lse;
  T *dq, *dk, *dv;
  float* dq_accum;
};

// ---- forward -----------------------------------------------------------------------
// One work item = (batch, query head, row tile): an online softmax over the tile's key tiles.
template <typename T, typename Mask>
void AttentionForward(const ForwardArgs<T>& a, const Mask& mask) {
  const Dims& d = a.dims;
  const int64_t Dp = RoundUp(d.D, kGemmCols), Dvp = RoundUp(d.Dv, kGemmCols);
  const KeyRange& range = mask.range;
  std::vector<std::pair<int64_t, int64_t>> row_tiles;
  mask.ForEachRowTile([&](int64_t i0, int64_t i1) { row_tiles.emplace_back(i0, i1); });
  const int64_t num_tiles = int64_t(row_tiles.size());

  ParallelFor(d.B * d.N * num_tiles, [&](int64_t item) {
    const int64_t b = item / (d.N * num_tiles), h = item / num_tiles % d.N;
    const int64_t i0 = row_tiles[item % num_tiles].first, i1 = row_tiles[item % num_tiles].second;
    const int64_t rows = i1 - i0, rows_pad = RoundUp(rows, kGemmRows), kvh = h / d.group();

    std::vector<float> q_tile(kTileRows * Dp), kt_tile(Dp * kTileCols), v_tile(kTileCols * Dvp),
        p_tile(kTileRows * kTileCols), acc(kTileRows * Dvp, 0.0f);
    std::vector<float> row_max(rows, kNegInf), row_sum(rows, 0.0f);

    // Scores come out already scaled: the scale is folded into the query tile.
    LoadRows(a.q + ((b * d.T + i0) * d.N + h) * d.D, d.N * d.D, rows, d.D, a.scale,
             q_tile.data(), rows_pad, Dp);

    mask.ForEachKeyTile(b, h, i0, i1, [&](int64_t j0, int64_t j1) {
      const int64_t cols = j1 - j0;
      LoadTransposed(a.k + ((b * d.S + j0) * d.K + kvh) * d.D, d.K * d.D, cols, d.D, 1.0f,
                     kt_tile.data(), Dp, kTileCols);
      LoadRows(a.v + ((b * d.S + j0) * d.K + kvh) * d.Dv, d.K * d.Dv, cols, d.Dv, 1.0f,
               v_tile.data(), cols, Dvp);
      GemmTile(rows_pad, kTileCols, d.D, q_tile.data(), Dp, kt_tile.data(), kTileCols,
               p_tile.data(), kTileCols, false);

      for (int64_t r = 0; r < rows_pad; ++r) {
        float* p = p_tile.data() + r * kTileCols;
        const auto [lo, hi] = r < rows ? VisibleColumns(range, i0 + r, j0, cols)
                                       : std::pair<int64_t, int64_t>{0, 0};
        if (lo >= hi) {
          std::fill(p, p + kTileCols, 0.0f);
          continue;
        }
        const float new_max = std::max(row_max[r], RowMax(p + lo, hi - lo));
        // Rescale what earlier tiles accumulated against the old running max.
        const float correction = row_max[r] == kNegInf ? 0.0f : std::exp(row_max[r] - new_max);
        const float tile_sum = ExpShiftedInPlace(p + lo, hi - lo, new_max);
        std::fill(p, p + lo, 0.0f);
        std::fill(p + hi, p + kTileCols, 0.0f);
        row_sum[r] = row_sum[r] * correction + tile_sum;
        row_max[r] = new_max;
        if (correction != 1.0f) ScaleRow(acc.data() + r * Dvp, Dvp, correction);
      }
      GemmTile(rows_pad, Dvp, cols, p_tile.data(), kTileCols, v_tile.data(), Dvp, acc.data(),
               Dvp, true);
    });

    // Rows that saw no key: o = 0, lse = -inf.
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen = row_sum[r] > 0.0f;
      ScaleRow(acc.data() + r * Dvp, Dvp, seen ? 1.0f / row_sum[r] : 0.0f);
      a.lse[(b * d.N + h) * d.T + i0 + r] = seen ? row_max[r] + std::log(row_sum[r]) : kNegInf;
    }
    StoreRows(acc.data(), Dvp, rows, d.Dv, a.o + ((b * d.T + i0) * d.N + h) * d.Dv, d.N * d.Dv);
  });
}

// ---- backward ----------------------------------------------------------------------
// One work item = (batch, kv head): it owns dk/dv of that kv head and dq of its query-head
// group, so nothing is shared between threads. Outer loop over key tiles (dk, dv stay in
// scratch), inner loop over the group's query heads and the row tiles that see the keys;
// dq accumulates in float32 in dq_accum.
template <typename T, typename Mask>
void AttentionBackward(const BackwardArgs<T>& a, const Mask& mask) {
  const Dims& d = a.dims;
  const int64_t Dp = RoundUp(d.D, kGemmCols), Dvp = RoundUp(d.Dv, kGemmCols), G = d.group();
  const KeyRange& range = mask.range;

  ParallelFor(d.B * d.K, [&](int64_t item) {
    const int64_t b = item / d.K, kvh = item % d.K;
    const int64_t q_stride = d.N * d.D, o_stride = d.N * d.Dv;
    const int64_t k_stride = d.K * d.D, v_stride = d.K * d.Dv;

    // delta_i = sum(do_i * o_i) per query row of the group, and zeroed dq accumulators.
    std::vector<float> delta(G * d.T);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kvh * G + g;
      for (int64_t i = 0; i < d.T; ++i) {
        const T* o_row = a.o + ((b * d.T + i) * d.N + h) * d.Dv;
        const T* do_row = a.dout + ((b * d.T + i) * d.N + h) * d.Dv;
        float sum = 0.0f;
        for (int64_t e = 0; e < d.Dv; ++e) sum += ToFloat(o_row[e]) * ToFloat(do_row[e]);
        delta[g * d.T + i] = sum;
        std::fill_n(a.dq_accum + ((b * d.T + i) * d.N + h) * d.D, d.D, 0.0f);
      }
    }

    std::vector<float> kt_tile(Dp * kTileCols), k_tile(kTileCols * Dp), vt_tile(Dvp * kTileCols);
    std::vector<float> dk_tile(kTileCols * Dp), dv_tile(kTileCols * Dvp);
    std::vector<float> q_tile(kTileRows * Dp), do_tile(kTileRows * Dvp), dq_tile(kTileRows * Dp);
    std::vector<float> p_tile(kTileRows * kTileCols), ds_tile(kTileRows * kTileCols);
    std::vector<float> pt_tile(kTileCols * kTileRows, 0.0f), dst_tile(kTileCols * kTileRows, 0.0f);

    mask.ForEachKeyTileOuter([&](int64_t j0, int64_t j1) {
      const int64_t cols = j1 - j0, cols_pad = RoundUp(cols, kGemmRows);
      const T* k_src = a.k + ((b * d.S + j0) * d.K + kvh) * d.D;
      const T* v_src = a.v + ((b * d.S + j0) * d.K + kvh) * d.Dv;
      LoadTransposed(k_src, k_stride, cols, d.D, 1.0f, kt_tile.data(), Dp, kTileCols);
      // dq = scale * dS k: the scale rides on this copy of k.
      LoadRows(k_src, k_stride, cols, d.D, a.scale, k_tile.data(), cols_pad, Dp);
      LoadTransposed(v_src, v_stride, cols, d.Dv, 1.0f, vt_tile.data(), Dvp, kTileCols);
      std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
      std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);

      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        mask.ForEachRowTileOfKeys(b, h, j0, j1, [&](int64_t i0, int64_t i1) {
          const int64_t rows = i1 - i0, rows_pad = RoundUp(rows, kGemmRows);
          // The scale rides on q: scores come out scaled and dk = dS^T (scale q).
          LoadRows(a.q + ((b * d.T + i0) * d.N + h) * d.D, q_stride, rows, d.D, a.scale,
                   q_tile.data(), rows_pad, Dp);
          LoadRows(a.dout + ((b * d.T + i0) * d.N + h) * d.Dv, o_stride, rows, d.Dv, 1.0f,
                   do_tile.data(), rows_pad, Dvp);
          GemmTile(rows_pad, kTileCols, d.D, q_tile.data(), Dp, kt_tile.data(), kTileCols,
                   p_tile.data(), kTileCols, false);  // scores
          GemmTile(rows_pad, kTileCols, d.Dv, do_tile.data(), Dvp, vt_tile.data(), kTileCols,
                   ds_tile.data(), kTileCols, false);  // dP = do v^T

          for (int64_t r = 0; r < rows_pad; ++r) {
            float* p = p_tile.data() + r * kTileCols;
            float* ds = ds_tile.data() + r * kTileCols;
            const float lse = r < rows ? a.lse[(b * d.N + h) * d.T + i0 + r] : kNegInf;
            auto [lo, hi] = r < rows ? VisibleColumns(range, i0 + r, j0, cols)
                                     : std::pair<int64_t, int64_t>{0, 0};
            if (lse == kNegInf) hi = lo;  // a row that saw nothing has no gradient
            if (lo < hi) {
              ExpShiftedInPlace(p + lo, hi - lo, lse);  // P = exp(s - lse)
              SoftmaxGradRow(p + lo, ds + lo, delta[g * d.T + i0 + r], ds + lo, hi - lo);
            }
            const int64_t keep_lo = std::min(lo, hi);
            std::fill(p, p + keep_lo, 0.0f);
            std::fill(p + hi, p + kTileCols, 0.0f);
            std::fill(ds, ds + keep_lo, 0.0f);
            std::fill(ds + hi, ds + kTileCols, 0.0f);
          }
          TransposeTile(p_tile.data(), rows, cols_pad, pt_tile.data());
          TransposeTile(ds_tile.data(), rows, cols_pad, dst_tile.data());
          // dv += P^T do, dk += dS^T (scale q), dq += dS (scale k).
          GemmTile(cols_pad, Dvp, rows, pt_tile.data(), kTileRows, do_tile.data(), Dvp,
                   dv_tile.data(), Dvp, true);
          GemmTile(cols_pad, Dp, rows, dst_tile.data(), kTileRows, q_tile.data(), Dp,
                   dk_tile.data(), Dp, true);
          GemmTile(rows_pad, Dp, cols, ds_tile.data(), kTileCols, k_tile.data(), Dp,
                   dq_tile.data(), Dp, false);
          for (int64_t r = 0; r < rows; ++r)
            AddRow(dq_tile.data() + r * Dp, a.dq_accum + ((b * d.T + i0 + r) * d.N + h) * d.D, d.D);
        });
      }
      StoreRows(dk_tile.data(), Dp, cols, d.D, a.dk + ((b * d.S + j0) * d.K + kvh) * d.D, k_stride);
      StoreRows(dv_tile.data(), Dvp, cols, d.Dv, a.dv + ((b * d.S + j0) * d.K + kvh) * d.Dv, v_stride);
    });

    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kvh * G + g;
      StoreRows(a.dq_accum + (b * d.T * d.N + h) * d.D, q_stride, d.T, d.D,
                a.dq + (b * d.T * d.N + h) * d.D, q_stride);
    }
  });
}

}  // namespace jax_sparsek::flash
