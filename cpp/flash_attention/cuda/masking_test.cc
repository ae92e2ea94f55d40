// Brute-force check of masking.cuh, the visibility logic every kernel relies on: random
// shapes, causal / window / block masks and tile sizes; asserts that
//   - tile ranges (key_tiles, query_tiles) and tile_status never skip a visible element,
//     and kTileFull is only reported for tiles whose elements are all visible;
//   - the per-row / per-key intervals (row_keys, key_rows) plus block_on equal visible();
//   - query tile t is in query_tiles(key tile n) exactly when n is in key_tiles(t): the
//     backward's deterministic dQ counts a query tile's turns from key_tiles and takes them
//     from query_tiles, so any mismatch would hang it.
// Plain C++ (not part of the extension):
//   g++ -std=c++17 -O2 -Icpp cpp/flash_attention/cuda/masking_test.cc -o /tmp/masking_test && /tmp/masking_test
#include <cstdio>
#include <random>
#include <vector>

#include "masking.cuh"

using namespace jax_sparsek::cuda;

int main() {
  std::mt19937 rng(1);
  auto uniform = [&](int n) { return int(rng() % unsigned(n)); };
  long checked = 0, fails = 0;
  auto fail = [&](const char* what, const MaskSpec& m, int a, int b) {
    if (++fails <= 10) {
      std::printf("FAIL %s: T=%d S=%d causal=%d window=(%d,%d) mask=%d (%d, %d)\n", what, m.T, m.S,
                  int(m.causal), m.left, m.right, m.block_mask != nullptr, a, b);
    }
  };
  for (int trial = 0; trial < 2000; ++trial) {
    MaskSpec m;
    m.T = 1 + uniform(300);
    m.S = 1 + uniform(300);
    m.causal = uniform(2);
    m.left = uniform(3) == 0 ? -1 : uniform(200);
    m.right = uniform(3) == 0 ? -1 : uniform(200);
    std::vector<uint8_t> bits;
    if (uniform(2)) {  // block-sparse calls have no window
      m.left = m.right = -1;
      m.bq = 1 + uniform(150);
      m.bk = 1 + uniform(150);
      m.rows = (m.T + m.bq - 1) / m.bq;
      m.cols = (m.S + m.bk - 1) / m.bk;
      bits.resize(size_t(m.rows) * m.cols);
      for (auto& x : bits) x = uniform(100) < 40;
      m.block_mask = bits.data();
    }
    const uint8_t* mask = m.block_mask;
    for (int i = 0; i < m.T + 3; ++i) {
      for (int j = 0; j < m.S + 3; ++j) {
        const Interval rk = row_keys(m, i), kr = key_rows(m, j);
        const bool by_row = i < m.T && j < m.S && j >= rk.lo && j <= rk.hi;
        const bool by_key = i < m.T && j < m.S && i >= kr.lo && i <= kr.hi;
        const bool vis = visible(m, mask, i, j);
        ++checked;
        if (by_row != by_key || (by_row && (!mask || block_on(m, mask, i, j))) != vis) fail("interval", m, i, j);
      }
    }
    const int tiles[3][2] = {{64, 64}, {128, 128}, {64, 128}};
    for (const auto& tile : tiles) {
      const int bm = tile[0], bn = tile[1];
      for (int r0 = 0; r0 < m.T; r0 += bm) {
        const TileRange keys = key_tiles(m, r0, bm, bn);
        for (int n = 0; n * bn < m.S; ++n) {
          bool any = false, all = true;
          for (int i = r0; i < r0 + bm && i < m.T; ++i) {
            for (int j = n * bn; j < (n + 1) * bn; ++j) {
              const bool v = visible(m, mask, i, j);
              any |= v;
              all &= v;
            }
          }
          const int status = tile_status(m, mask, r0, bm, n * bn, bn);
          ++checked;
          if (any && (n < keys.first || n >= keys.end || status == kTileOff)) fail("key tile skipped", m, r0, n);
          if (status == kTileFull && !all) fail("full tile has masked elements", m, r0, n);
        }
      }
      for (int c0 = 0; c0 < m.S; c0 += bn) {
        const TileRange queries = query_tiles(m, c0, bn, bm);
        for (int t = 0; t * bm < m.T; ++t) {
          bool any = false;
          for (int i = t * bm; i < (t + 1) * bm && i < m.T; ++i) {
            for (int j = c0; j < c0 + bn && j < m.S; ++j) any |= visible(m, mask, i, j);
          }
          ++checked;
          if (any && (t < queries.first || t >= queries.end || tile_status(m, mask, t * bm, bm, c0, bn) == kTileOff)) {
            fail("query tile skipped", m, c0, t);
          }
          const TileRange keys = key_tiles(m, t * bm, bm, bn);
          const int n = c0 / bn;
          if ((t >= queries.first && t < queries.end) != (n >= keys.first && n < keys.end)) {
            fail("query_tiles and key_tiles disagree", m, c0, t);
          }
        }
      }
    }
  }
  std::printf("masking_test: %ld checks, %ld failures\n", checked, fails);
  return fails != 0;
}
