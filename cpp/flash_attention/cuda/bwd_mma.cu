// Backward pass (FlashAttention-2 style, mma.sync m16n8k16), three kernels on one stream:
//   1. bwd_delta_kernel: delta_i = sum_d dO_id O_id per query row (fp32), written into the dq
//      output buffer, which is free until step 3 (2 D >= 128 bytes per row: room for delta and
//      the deterministic mode's counters);
//   2. bwd_kernel: one CTA per (128-key tile, kv head, batch), 8 warps of 16 keys each. K and
//      V stay in shared memory; for every query head of the kv head's group and every query
//      tile (64 rows) that sees the key tile, Q and dO stream through a two-stage TMA
//      pipeline, and the CTA accumulates dK and dV in registers (no atomics, deterministic)
//      and adds its dQ share to the fp32 workspace with atomics;
//   3. scale_to_16bit_kernel: dq = scale * dq_accum in the input dtype.
// Deterministic mode (BwdArgs::deterministic): step 2 adds the dQ shares of a query tile in a
// fixed order, the highest key tile first (still by atomics, which need no load round trip,
// but one CTA after the other, so every element sums in the same order). A counter per (batch,
// query head, query tile), next to delta in the dq buffer, says how many key tiles have added
// theirs; a CTA waits for its turn. The key tiles launch highest first (blockIdx.x counts
// down), so a CTA only waits for CTAs launched before it, and the wait ends as long as CTAs
// start in launch order (the hardware's behaviour, not a CUDA guarantee). With causal
// masks the highest key tiles see the fewest query tiles and finish first: the turns rarely
// make a CTA wait.
// Accumulation mode (BwdArgs::dk_accum / dv_accum set, used by SparseK's window part): step 2
// stores fp32 dk and dv into those buffers instead, and step 3 is skipped.
#include <algorithm>

#include "attention_kernels.h"
#include "ptx.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = 64;   // query rows per step
constexpr int kBN = 128;  // keys per CTA
constexpr int kWarps = 8, kThreads = kWarps * 32;

struct BwdKernelParams {
  MaskSpec mask;
  int N, K, group;
  float scale, scale_log2;
  const float* lse;    // [B, N, T]
  const float* delta;  // [B, N, T]
  float* dq_accum;     // [B, T, N, D]
  int* dq_turns;       // [B, N, query tiles] counters in deterministic mode, else null
  void *dk, *dv;       // [B, S, K, D]
  float *dk_accum, *dv_accum;  // [B, S, K, D] fp32 in accumulation mode, else null
};

template <int D>
struct Smem {
  static constexpr uint32_t kKVBytes = kBN * D * 2, kQBytes = kBM * D * 2;
  static constexpr uint32_t kK = 0, kV = kK + kKVBytes, kQ = kV + kKVBytes;  // Q[2]
  static constexpr uint32_t kDO = kQ + 2 * kQBytes;                           // dO[2]
  static constexpr uint32_t kDS = kDO + 2 * kQBytes;       // dS^T [kBN keys][kBM queries]
  static constexpr uint32_t kLse = kDS + kBN * kBM * 2;    // [2][kBM] fp32, log2 domain
  static constexpr uint32_t kDelta = kLse + 2 * kBM * 4;   // [2][kBM] fp32
  static constexpr uint32_t kBars = kDelta + 2 * kBM * 4;  // kv, qdo[2]
  static constexpr uint32_t kNextTurn = kBars + 3 * 8;    // Step (deterministic dQ)
  static constexpr int kBytes = 1024 + kNextTurn + 8;
};

// One step of the CTA's loop: query head (index within the group) and query tile.
struct Step {
  int hh, m;
};

// The next step at or after (hh, m_from) whose (query tile, key tile) is not off.
__device__ __forceinline__ Step next_step(const BwdKernelParams& p, int b, int kvh, int c0,
                                          TileRange qt, int hh, int m_from) {
  for (; hh < p.group; ++hh, m_from = qt.first) {
    const uint8_t* mask = p.mask.mask_for(b, kvh * p.group + hh);
    const int m = next_query_tile(p.mask, mask, c0, kBN, kBM, m_from, qt.end);
    if (m < qt.end) return {hh, m};
  }
  return {p.group, 0};
}

// Deterministic dQ, run by thread 0 of a CTA. Every (head, query tile) of the key tile's range
// takes its turn, in the CTA's step order, also those the block mask turns off (they add
// nothing); `next` (shared memory, which spares the main loop's registers) is the next
// position to take. Key tile x's turn at query tile m comes after the key tiles above x that
// see m: masking_test.cc checks that query_tiles and key_tiles agree on who sees m.
struct DqTurns {
  const BwdKernelParams* p;
  int b, kvh, key_tile;
  TileRange qt;
  Step* next;

  __device__ __forceinline__ int* counter(Step st) const {
    const int num_query_tiles = (p->mask.T + kBM - 1) / kBM;
    return p->dq_turns + (int64_t(b) * p->N + kvh * p->group + st.hh) * num_query_tiles + st.m;
  }
  // Waits until query tile st.m's counter reaches this key tile's turn; ld.acquire orders the
  // CTA's adds (after a CTA barrier) after the previous key tiles' adds.
  __device__ __forceinline__ void wait(Step st) const {
    const int turn = key_tiles(p->mask, st.m * kBM, kBM, kBN).end - 1 - key_tile;
    const int* c = counter(st);
    for (;;) {
      int done;
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(done) : "l"(c) : "memory");
      if (done >= turn) return;
      __nanosleep(100);
    }
  }
  // Hands st's turn on (after a CTA barrier that follows the adds) and moves past st.
  // Waiting relies on CTAs starting in block order (the hardware's; not a CUDA guarantee).
  __device__ __forceinline__ void pass(Step st) const {
    __threadfence();
    atomicAdd(counter(st), 1);
    *next = st.m + 1 == qt.end ? Step{st.hh + 1, qt.first} : Step{st.hh, st.m + 1};
  }
  // Takes and passes every turn before `until`: the steps the block mask skipped.
  __device__ __forceinline__ void pass_before(Step until) const {
    for (Step st = *next; st.hh < until.hh || (st.hh == until.hh && st.m < until.m); st = *next) {
      wait(st);
      pass(st);
    }
  }
  // The turn of step st: the skipped steps' turns first, then wait for st's.
  __device__ __forceinline__ void take_turn(Step st) const {
    pass_before(st);
    wait(st);
  }
};

// kDeterministic is a template parameter: its turns cost the default kernel no registers.
template <bool kBf16, int D, bool kDeterministic>
__global__ void __launch_bounds__(kThreads, 1)
    bwd_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
               const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
               const BwdKernelParams p) {
  using Elem = typename Elem16<kBf16>::type;
  using L = Smem<D>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sK = base + L::kK, sV = base + L::kV, sQ = base + L::kQ, sDO = base + L::kDO;
  const uint32_t sDS = base + L::kDS;
  float* lse_s = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kLse);
  float* delta_s = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + L::kDelta);
  const uint32_t bar_kv = base + L::kBars, bar_qdo = bar_kv + 8;  // bar_qdo[2]
  Step* dq_next_turn = reinterpret_cast<Step*>(smem_raw + (base - smem_u32(smem_raw)) + L::kNextTurn);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int key_tile = kDeterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int c0 = key_tile * kBN;
  const int T = p.mask.T, S = p.mask.S;
  const TileRange qt = query_tiles(p.mask, c0, kBN, kBM);

  if (tid == 0) {
    if constexpr (kDeterministic) *dq_next_turn = {0, qt.first};
    mbar_init(bar_kv, 1);
    mbar_init(bar_qdo, 1);
    mbar_init(bar_qdo + 8, 1);
    fence_barrier_init();
  }
  __syncthreads();

  auto load_qdo = [&](int stage, Step st) {
    const uint32_t bar = bar_qdo + 8 * stage;
    const int h = kvh * p.group + st.hh;
    mbar_arrive_expect_tx(bar, 2 * L::kQBytes);
    tma_load_tile<kBM, D>(sQ + stage * L::kQBytes, &tm_q, bar, st.m * kBM, h, b);
    tma_load_tile<kBM, D>(sDO + stage * L::kQBytes, &tm_do, bar, st.m * kBM, h, b);
  };
  // Row statistics of a step: lse in the log2 domain (+inf for rows that see no key or lie
  // past T, so that their probabilities are exactly 0) and delta. Thread t < 2 * kBM loads one.
  auto load_stat = [&](Step st, int t) -> float {
    if (st.hh >= p.group) return 0.f;
    const int i = st.m * kBM + (t % kBM);
    const int h = kvh * p.group + st.hh;
    if (i >= T) return t < kBM ? INFINITY : 0.f;
    const int64_t idx = (int64_t(b) * p.N + h) * T + i;
    if (t < kBM) {
      const float l = p.lse[idx];
      return l == -INFINITY ? INFINITY : l * kLog2e;
    }
    return p.delta[idx];
  };
  auto store_stat = [&](int stage, int t, float v) {
    if (t < kBM) lse_s[stage * kBM + t] = v;
    else delta_s[stage * kBM + t - kBM] = v;
  };

  Step cur = next_step(p, b, kvh, c0, qt, 0, qt.first);
  Step nxt = cur.hh < p.group ? next_step(p, b, kvh, c0, qt, cur.hh, cur.m + 1) : cur;
  if (tid == 0 && cur.hh < p.group) {
    mbar_arrive_expect_tx(bar_kv, 2 * L::kKVBytes);
    tma_load_tile<kBN, D>(sK, &tm_k, bar_kv, c0, kvh, b);
    tma_load_tile<kBN, D>(sV, &tm_v, bar_kv, c0, kvh, b);
    load_qdo(0, cur);
    if (nxt.hh < p.group) load_qdo(1, nxt);
  }
  if (tid < 2 * kBM) {
    store_stat(0, tid, load_stat(cur, tid));
    store_stat(1, tid, load_stat(nxt, tid));
  }
  __syncthreads();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  if (cur.hh < p.group) mbar_wait(bar_kv, 0);
  const int key_a = c0 + warp * 16 + g;  // this thread's keys: key_a, key_a + 8
  const Interval key_queries[2] = {key_rows(p.mask, key_a), key_rows(p.mask, key_a + 8)};
  const DqTurns turns{&p, b, kvh, key_tile, qt, dq_next_turn};

  for (int it = 0; cur.hh < p.group; ++it) {
    const int stage = it & 1;
    mbar_wait(bar_qdo + 8 * stage, (it >> 1) & 1);
    const uint32_t q_s = sQ + stage * L::kQBytes, do_s = sDO + stage * L::kQBytes;
    const int h = kvh * p.group + cur.hh, q0 = cur.m * kBM;
    const uint8_t* mask = p.mask.mask_for(b, h);
    const bool partial = tile_status(p.mask, mask, q0, kBM, c0, kBN) == kTilePartial;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float st[kBM / 8][4] = {}, dpt[kBM / 8][4] = {};
#pragma unroll 1
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      const int a_row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, a_col = kk * 16 + (lane / 16) * 8;
      ldsm_x4(ka, tile_addr(sK, kBN, a_row, a_col));
      ldsm_x4(va, tile_addr(sV, kBN, a_row, a_col));
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        const int b_row = np * 16 + (lane / 16) * 8 + (lane % 8), b_col = kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t qb[4], ob[4];
        ldsm_x4(qb, tile_addr(q_s, kBM, b_row, b_col));
        ldsm_x4(ob, tile_addr(do_s, kBM, b_row, b_col));
        mma_16816<kBf16>(st[2 * np], ka, qb[0], qb[1]);
        mma_16816<kBf16>(st[2 * np + 1], ka, qb[2], qb[3]);
        mma_16816<kBf16>(dpt[2 * np], va, ob[0], ob[1]);
        mma_16816<kBf16>(dpt[2 * np + 1], va, ob[2], ob[3]);
      }
    }

    // P^T = exp2(S^T * scale * log2e - lse2), zero where the query does not see the key
    // (partial tiles: two compares per element, block-mask lookups only for tiles that
    // straddle mask blocks); dS^T = P^T (dP^T - delta).
    const float* lse2 = lse_s + stage * kBM;
    const float* dlt = delta_s + stage * kBM;
#pragma unroll
    for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        st[nb][v] = fast_exp2(st[nb][v] * p.scale_log2 - lse2[nb * 8 + 2 * t4 + (v & 1)]);
      }
    }
    if (partial) {
#pragma unroll
      for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int i = q0 + nb * 8 + 2 * t4 + (v & 1);
          const Interval& r = key_queries[v >> 1];
          st[nb][v] = (i >= r.lo && i <= r.hi) ? st[nb][v] : 0.f;
        }
      }
      if (mask) {
#pragma unroll
        for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const int i = q0 + nb * 8 + 2 * t4 + (v & 1), j = key_a + 8 * (v >> 1);
            if (st[nb][v] != 0.f && !block_on(p.mask, mask, i, j)) st[nb][v] = 0.f;
          }
        }
      }
    }
#pragma unroll
    for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
      for (int v = 0; v < 4; ++v) dpt[nb][v] = st[nb][v] * (dpt[nb][v] - dlt[nb * 8 + 2 * t4 + (v & 1)]);
    }

    // 16-bit A fragments of P^T and dS^T (16 keys x 16 queries per k-step); the fp32 scores die.
    uint32_t pa[kBM / 16][4], da[kBM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      pack_a<kBf16>(pa[kk], st, kk);
      pack_a<kBf16>(da[kk], dpt, kk);
    }
    // dS^T (16-bit) to shared memory for the dQ product: fragment register 2 * half + ri holds
    // key row g + 8 ri, query columns (2 kk + half) * 8 + 2 t4 + {0, 1}.
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const int r = warp * 16 + g + 8 * (reg & 1), col = (2 * kk + (reg >> 1)) * 8;
        asm volatile("st.shared.b32 [%0], %1;" ::"r"(tile_addr(sDS, kBN, r, col) + 4 * t4),
                     "r"(da[kk][reg]) : "memory");
      }
    }
    // dV += P^T dO and dK += dS^T Q (contraction over the 64 queries).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const int b_row = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        const int b_col = np * 16 + (lane / 16) * 8;
        uint32_t ob[4], qb[4];
        ldsm_x4_trans(ob, tile_addr(do_s, kBM, b_row, b_col));
        ldsm_x4_trans(qb, tile_addr(q_s, kBM, b_row, b_col));
        mma_16816<kBf16>(dv[2 * np], pa[kk], ob[0], ob[1]);
        mma_16816<kBf16>(dv[2 * np + 1], pa[kk], ob[2], ob[3]);
        mma_16816<kBf16>(dk[2 * np], da[kk], qb[0], qb[1]);
        mma_16816<kBf16>(dk[2 * np + 1], da[kk], qb[2], qb[3]);
      }
    }
    __syncthreads();  // (A) dS^T complete; Q / dO of this stage no longer read

    Step after = nxt.hh < p.group ? next_step(p, b, kvh, c0, qt, nxt.hh, nxt.m + 1) : nxt;
    if (tid == 0 && after.hh < p.group) load_qdo(stage, after);
    const float stat_prefetch = tid < 2 * kBM ? load_stat(after, tid) : 0.f;

    // dQ (64 queries x D) += dS K: warp w takes queries 16 (w % 4).., columns (w / 4) D/2...
    {
      const int q_row0 = (warp % 4) * 16, d0 = (warp / 4) * (D / 2);
      float dq[D / 16][4] = {};
#pragma unroll 1
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, tile_addr(sDS, kBN, kk * 16 + (lane % 8) + (lane / 16) * 8,
                                   q_row0 + ((lane / 8) % 2) * 8));
#pragma unroll
        for (int np = 0; np < D / 32; ++np) {
          uint32_t kb[4];
          ldsm_x4_trans(kb, tile_addr(sK, kBN, kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                      d0 + np * 16 + (lane / 16) * 8));
          mma_16816<kBf16>(dq[2 * np], a, kb[0], kb[1]);
          mma_16816<kBf16>(dq[2 * np + 1], a, kb[2], kb[3]);
        }
      }
      if constexpr (kDeterministic) {
        if (tid == 0) turns.take_turn(cur);
        __syncthreads();  // every thread adds after the previous key tiles
      }
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const int i = q0 + q_row0 + g + 8 * ri;
        if (i >= T) continue;
        float2* row = reinterpret_cast<float2*>(
            p.dq_accum + ((int64_t(b) * T + i) * p.N + h) * D + d0 + 2 * t4);
#pragma unroll
        for (int nb = 0; nb < D / 16; ++nb) {
          atomicAdd(row + nb * 4, make_float2(dq[nb][2 * ri], dq[nb][2 * ri + 1]));
        }
      }
    }
    if (tid < 2 * kBM) store_stat(stage, tid, stat_prefetch);
    __syncthreads();  // (B) dS^T reads done; next stage's statistics visible; dQ added
    if constexpr (kDeterministic) {
      if (tid == 0) turns.pass(cur);
    }
    cur = nxt;
    nxt = after;
  }

  if constexpr (kDeterministic) {
    if (tid == 0 && qt.first < qt.end) turns.pass_before({p.group, qt.first});
  }

  // Epilogue: dK = scale * sum dS^T Q, dV = sum P^T dO, keys < S (every key row is written,
  // also in key tiles that no query sees).
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int j = key_a + 8 * ri;
    if (j >= S) continue;
    const int64_t off = ((int64_t(b) * S + j) * p.K + kvh) * D + 2 * t4;
    if (p.dk_accum) {
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        *reinterpret_cast<float2*>(p.dk_accum + off + nb * 8) =
            make_float2(dk[nb][2 * ri] * p.scale, dk[nb][2 * ri + 1] * p.scale);
        *reinterpret_cast<float2*>(p.dv_accum + off + nb * 8) = make_float2(dv[nb][2 * ri], dv[nb][2 * ri + 1]);
      }
      continue;
    }
    Elem* dk_row = static_cast<Elem*>(p.dk) + off;
    Elem* dv_row = static_cast<Elem*>(p.dv) + off;
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      *reinterpret_cast<uint32_t*>(dk_row + nb * 8) =
          pack2<kBf16>(dk[nb][2 * ri] * p.scale, dk[nb][2 * ri + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + nb * 8) = pack2<kBf16>(dv[nb][2 * ri], dv[nb][2 * ri + 1]);
    }
  }
}

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]; one warp per (b, i, h) row.
template <bool kBf16, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const uint16_t* o, const uint16_t* dout,
                                                        float* delta, int64_t rows, int T, int N) {
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  constexpr int kPer = D / 32;  // 2 or 4 elements per lane
  float acc = 0.f;
  const uint16_t* orow = o + row * D + lane * kPer;
  const uint16_t* drow = dout + row * D + lane * kPer;
  if constexpr (kPer == 4) {
    const uint2 ov = *reinterpret_cast<const uint2*>(orow), dv = *reinterpret_cast<const uint2*>(drow);
    const float2 o0 = unpack2<kBf16>(ov.x), o1 = unpack2<kBf16>(ov.y);
    const float2 d0 = unpack2<kBf16>(dv.x), d1 = unpack2<kBf16>(dv.y);
    acc = o0.x * d0.x + o0.y * d0.y + o1.x * d1.x + o1.y * d1.y;
  } else {
    const float2 o0 = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(orow));
    const float2 d0 = unpack2<kBf16>(*reinterpret_cast<const uint32_t*>(drow));
    acc = o0.x * d0.x + o0.y * d0.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int h = int(row % N);
    const int64_t bt = row / N;  // b * T + i
    const int64_t b = bt / T, i = bt % T;
    delta[(b * N + h) * T + i] = acc;
  }
}

// dst = scale * src in the 16-bit dtype; 4 elements per thread.
template <bool kBf16>
__global__ void __launch_bounds__(256) scale_to_16bit_kernel(const float* src, uint16_t* dst,
                                                             int64_t n4, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(src)[i];
    reinterpret_cast<uint2*>(dst)[i] =
        make_uint2(pack2<kBf16>(v.x * scale, v.y * scale), pack2<kBf16>(v.z * scale, v.w * scale));
  }
}

template <bool kBf16, int D>
cudaError_t Launch(const BwdArgs& a, cudaStream_t stream, std::string* error) {
  const AttentionDims& d = a.dims;
  const int64_t rows = int64_t(d.B) * d.T * d.N;
  cudaError_t err = cudaMemsetAsync(a.dq_accum, 0, rows * D * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  // delta, then the deterministic mode's counters, live in the dq buffer (2 D >= 128 bytes per
  // row) until the dq conversion overwrites it.
  float* delta = static_cast<float*>(a.dq);
  int* dq_turns = nullptr;
  if (a.deterministic && !a.dk_accum) {
    dq_turns = reinterpret_cast<int*>(delta + rows);
    const int64_t counters = int64_t(d.B) * d.N * ((d.T + kBM - 1) / kBM);
    if ((err = cudaMemsetAsync(dq_turns, 0, counters * sizeof(int), stream)) != cudaSuccess) return err;
  }
  bwd_delta_kernel<kBf16, D><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const uint16_t*>(a.o), static_cast<const uint16_t*>(a.do_), delta, rows, d.T, d.N);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  CUtensorMap tq, tk, tv, tdo;
  if (!MakeTensorMap(&tq, a.q, kBf16, d.B, d.T, d.N, D, error) ||
      !MakeTensorMap(&tk, a.k, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&tv, a.v, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&tdo, a.do_, kBf16, d.B, d.T, d.N, D, error)) {
    return cudaErrorInvalidValue;
  }
  BwdKernelParams p{a.mask, d.N, d.K, d.group(), a.scale, a.scale * kLog2e,
                    a.lse, delta, a.dq_accum, dq_turns, a.dk, a.dv, a.dk_accum, a.dv_accum};
  auto kernel = dq_turns ? bwd_kernel<kBf16, D, true> : bwd_kernel<kBf16, D, false>;
  constexpr int smem = Smem<D>::kBytes;
  if ((err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem)) != cudaSuccess) return err;
  const dim3 grid((d.S + kBN - 1) / kBN, d.K, d.B);
  kernel<<<grid, kThreads, smem, stream>>>(tq, tk, tv, tdo, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (a.dk_accum) return cudaSuccess;  // accumulation mode: the caller converts

  return LaunchScaleTo16Bit(a.dq_accum, a.dq, rows * D, a.scale, kBf16, stream);
}

}  // namespace

cudaError_t LaunchScaleTo16Bit(const float* src, void* dst, int64_t elements, float scale, bool bf16,
                               cudaStream_t stream) {
  const int64_t n4 = elements / 4;
  const unsigned blocks = unsigned(std::min<int64_t>((n4 + 255) / 256, 1 << 16));
  auto kernel = bf16 ? scale_to_16bit_kernel<true> : scale_to_16bit_kernel<false>;
  kernel<<<blocks, 256, 0, stream>>>(src, static_cast<uint16_t*>(dst), n4, scale);
  return cudaGetLastError();
}

cudaError_t LaunchFlashBackward(const BwdArgs& a, cudaStream_t stream, std::string* error) {
  const AttentionDims& d = a.dims;
  const int64_t q_bytes = int64_t(d.B) * d.T * d.N * d.D * 2, kv_bytes = int64_t(d.B) * d.S * d.K * d.D * 2;
  if (q_bytes == 0 || kv_bytes == 0) {  // no queries or no keys: every gradient is zero
    cudaError_t err = cudaSuccess;
    if (a.dk_accum) {  // accumulation mode: the outputs are the fp32 buffers
      if (q_bytes) err = cudaMemsetAsync(a.dq_accum, 0, 2 * q_bytes, stream);
      if (err == cudaSuccess && kv_bytes) err = cudaMemsetAsync(a.dk_accum, 0, 2 * kv_bytes, stream);
      if (err == cudaSuccess && kv_bytes) err = cudaMemsetAsync(a.dv_accum, 0, 2 * kv_bytes, stream);
      return err;
    }
    if (q_bytes) err = cudaMemsetAsync(a.dq, 0, q_bytes, stream);
    if (err == cudaSuccess && kv_bytes) err = cudaMemsetAsync(a.dk, 0, kv_bytes, stream);
    if (err == cudaSuccess && kv_bytes) err = cudaMemsetAsync(a.dv, 0, kv_bytes, stream);
    return err;
  }
  if (a.dims.D == 64) return a.bf16 ? Launch<true, 64>(a, stream, error) : Launch<false, 64>(a, stream, error);
  return a.bf16 ? Launch<true, 128>(a, stream, error) : Launch<false, 128>(a, stream, error);
}

}  // namespace jax_sparsek::cuda
