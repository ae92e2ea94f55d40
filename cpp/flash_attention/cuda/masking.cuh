// Which keys a query sees (SPEC.md §1-2), at three granularities: key/query ranges of a
// tile (to bound the loops), tile status (skip / no element masking / element masking),
// and single elements. Shared by every attention kernel and by the host launchers.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace jax_sparsek::cuda {

// Query row i sits at position p_i = i + S - T; key j is visible iff
//   (!causal || j <= p_i) && (left < 0 || j >= p_i - left) && (right < 0 || j <= p_i + right)
//   && (block_mask == nullptr || block_mask[b, head(h), i / bq, j / bk]).
struct MaskSpec {
  int T = 0, S = 0;
  bool causal = false;
  int left = -1, right = -1;  // window bounds, -1 = unbounded (clamped to S + T on the host)
  const uint8_t* block_mask = nullptr;  // [Bm, Hm, rows, cols] bools, or null
  int bq = 1, bk = 1;
  int rows = 0, cols = 0;  // ceil(T / bq), ceil(S / bk)
  int64_t batch_stride = 0;  // 0 when the mask is shared by the batch
  int64_t head_stride = 0;   // 0 when the mask is shared by the heads
  int head_div = 1;          // query head h reads mask head h / head_div

  JSK_HD const uint8_t* mask_for(int b, int h) const {
    return block_mask ? block_mask + b * batch_stride + (h / head_div) * head_stride : nullptr;
  }

  // Largest key any of the rows [r0, r1) may see, ignoring the block mask (may be < 0).
  JSK_HD int key_hi(int r_last) const {
    int hi = S - 1;
    const int p = r_last + S - T;
    if (causal && p < hi) hi = p;
    if (right >= 0 && p + right < hi) hi = p + right;
    return hi;
  }
  JSK_HD int key_lo(int r_first) const {
    const int lo = left >= 0 ? r_first + S - T - left : 0;
    return lo > 0 ? lo : 0;
  }
  // Query rows that may see a key in [c0, c1): [row_lo(c0), row_hi(c1)].
  JSK_HD int row_lo(int c0) const {
    if (!causal && right < 0) return 0;
    // The row's last key is p_i + reach: reach = 0 when causal, else the right bound.
    const int reach = causal ? 0 : right;
    const int r = c0 - reach - (S - T);
    return r > 0 ? r : 0;
  }
  JSK_HD int row_hi(int c1) const {
    if (left < 0) return T - 1;
    const int r = c1 - 1 + left - (S - T);
    return r < T - 1 ? r : T - 1;
  }
};

enum TileStatus : int { kTileOff = 0, kTileFull = 1, kTilePartial = 2 };

JSK_HD int imin(int a, int b) { return a < b ? a : b; }

// Status of the tile rows [r0, r0 + bm) x keys [c0, c0 + bn) for one (batch, head);
// `mask` is MaskSpec::mask_for(b, h). Rows past T never count (they are not stored).
JSK_HD int tile_status(const MaskSpec& m, const uint8_t* mask, int r0, int bm,
                                           int c0, int bn) {
  const int r1 = imin(r0 + bm, m.T);  // exclusive
  const int c1 = imin(c0 + bn, m.S);
  if (r0 >= r1 || c0 >= c1) return kTileOff;
  // Dense (causal / window) part: off when the union of the rows' key intervals misses
  // the tile; full when every row sees every column.
  if (m.key_hi(r1 - 1) < c0 || m.key_lo(r0) > c1 - 1) return kTileOff;
  bool full = c0 + bn <= m.S && m.key_lo(r1 - 1) <= c0 && m.key_hi(r0) >= c0 + bn - 1;
  if (mask) {
    bool any = false, all = true;
    const int rb1 = (r1 - 1) / m.bq, cb1 = (c1 - 1) / m.bk;
    for (int rb = r0 / m.bq; rb <= rb1; ++rb) {
      const uint8_t* row = mask + int64_t(rb) * m.cols;
      for (int cb = c0 / m.bk; cb <= cb1; ++cb) {
        const bool on = row[cb] != 0;
        any |= on;
        all &= on;
      }
    }
    if (!any) return kTileOff;
    full &= all;
  }
  return full ? kTileFull : kTilePartial;
}

// Keys [lo, hi] that query row i sees before the block mask (none when hi < lo). Lets the
// kernels mask a partial tile with two compares per element.
struct Interval {
  int lo, hi;
};
JSK_HD Interval row_keys(const MaskSpec& m, int i) {
  if (i >= m.T) return {0, -1};
  return {m.key_lo(i), m.key_hi(i)};
}
// Queries [lo, hi] that see key j before the block mask (none when hi < lo).
JSK_HD Interval key_rows(const MaskSpec& m, int j) {
  if (j >= m.S) return {0, -1};
  return {m.row_lo(j), m.row_hi(j + 1)};
}
// The block-mask bit of (i, j); i < T and j < S.
JSK_HD bool block_on(const MaskSpec& m, const uint8_t* mask, int i, int j) {
  return mask[int64_t(i / m.bq) * m.cols + j / m.bk] != 0;
}

// Whether query row i sees key j (rows past T see nothing).
JSK_HD bool visible(const MaskSpec& m, const uint8_t* mask, int i, int j) {
  if (i >= m.T || j >= m.S) return false;
  const int p = i + m.S - m.T;
  if (m.causal && j > p) return false;
  if (m.left >= 0 && j < p - m.left) return false;
  if (m.right >= 0 && j > p + m.right) return false;
  if (mask && !mask[int64_t(i / m.bq) * m.cols + j / m.bk]) return false;
  return true;
}

// First key tile n >= n_from (of width bn) in [n_from, n_end) that is not off for the
// query rows [r0, r0 + bm); n_end when none. Dense masks: every tile in range is on.
JSK_HD int next_key_tile(const MaskSpec& m, const uint8_t* mask, int r0, int bm,
                                             int bn, int n_from, int n_end) {
  if (!mask) return n_from;
  int n = n_from;
  while (n < n_end && tile_status(m, mask, r0, bm, n * bn, bn) == kTileOff) ++n;
  return n;
}

// First query tile t >= t_from in [t_from, t_end) not off for the keys [c0, c0 + bn).
JSK_HD int next_query_tile(const MaskSpec& m, const uint8_t* mask, int c0,
                                               int bn, int bm, int t_from, int t_end) {
  if (!mask) return t_from;
  int t = t_from;
  while (t < t_end && tile_status(m, mask, t * bm, bm, c0, bn) == kTileOff) ++t;
  return t;
}

// Key tiles [first, end) a query tile may touch; empty when first >= end.
struct TileRange {
  int first, end;
};
JSK_HD TileRange key_tiles(const MaskSpec& m, int r0, int bm, int bn) {
  const int r1 = imin(r0 + bm, m.T);
  if (r0 >= r1) return {0, 0};
  const int lo = m.key_lo(r0), hi = m.key_hi(r1 - 1);
  if (hi < lo) return {0, 0};
  return {lo / bn, hi / bn + 1};
}
JSK_HD TileRange query_tiles(const MaskSpec& m, int c0, int bn, int bm) {
  const int c1 = imin(c0 + bn, m.S);
  if (c0 >= c1) return {0, 0};
  const int lo = m.row_lo(c0), hi = m.row_hi(c1);
  if (hi < lo) return {0, 0};
  return {lo / bm, hi / bm + 1};
}

}  // namespace jax_sparsek::cuda
