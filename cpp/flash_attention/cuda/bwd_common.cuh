// What the two backward kernels (bwd_wgmma.cu, the default, and bwd_mma.cu, the portable
// reference) share: one CTA per (128-key tile, kv head, batch) that loops over the 64-row query
// tiles (of every query head of the group) that see its keys, the step order with the block
// mask's skips, the deterministic dQ turns, P^T and dS^T of a thread's accumulator fragment,
// and the dK / dV epilogue. bwd.cu launches them (after the delta pass, before the dq
// conversion).
#pragma once

#include "attention_kernels.h"
#include "ptx.cuh"

namespace jax_sparsek::cuda {

constexpr int kBwdQueries = 64;  // query rows per step
constexpr int kBwdKeys = 128;    // keys per CTA

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

// What bwd.cu hands a kernel file's launcher: the kernel's parameters and TMA maps.
struct BwdLaunch {
  bool bf16, deterministic;
  int D;
  dim3 grid;
  CUtensorMap tm_q, tm_k, tm_v, tm_do;
  BwdKernelParams params;
};
cudaError_t LaunchBwdWgmma(const BwdLaunch& l, cudaStream_t stream);
cudaError_t LaunchBwdMma(const BwdLaunch& l, cudaStream_t stream);

// One step of a CTA's loop: query head (index within the group) and query tile.
struct Step {
  int hh, m;
};

// The next step at or after (hh, m_from) whose (query tile, key tile) is not off; hh = group
// when there is none.
__device__ __forceinline__ Step next_step(const BwdKernelParams& p, int b, int kvh, int c0,
                                          TileRange qt, int hh, int m_from) {
  for (; hh < p.group; ++hh, m_from = qt.first) {
    const uint8_t* mask = p.mask.mask_for(b, kvh * p.group + hh);
    const int m = next_query_tile(p.mask, mask, c0, kBwdKeys, kBwdQueries, m_from, qt.end);
    if (m < qt.end) return {hh, m};
  }
  return {p.group, 0};
}

// Row statistic t of step st (t < kBwdQueries: lse in the log2 domain, +inf for rows that see
// no key or lie past T so that their probabilities are exactly 0; else delta of row
// t - kBwdQueries).
__device__ __forceinline__ float row_stat(const BwdKernelParams& p, int b, int kvh, Step st, int t) {
  if (st.hh >= p.group) return 0.f;
  const int i = st.m * kBwdQueries + (t % kBwdQueries);
  const int T = p.mask.T;
  if (i >= T) return t < kBwdQueries ? INFINITY : 0.f;
  const int64_t idx = (int64_t(b) * p.N + kvh * p.group + st.hh) * T + i;
  if (t < kBwdQueries) {
    const float l = p.lse[idx];
    return l == -INFINITY ? INFINITY : l * kLog2e;
  }
  return p.delta[idx];
}

// Deterministic dQ, run by one thread of a CTA. Every (head, query tile) of the key tile's
// range takes its turn, in the CTA's step order, also those the block mask turns off (they add
// nothing); `next` (shared memory, which spares the main loop's registers) is the next position
// to take. Key tile x's turn at query tile m comes after the key tiles above x that see m:
// masking_test.cc checks that query_tiles and key_tiles agree on who sees m. The key tiles
// launch highest first (blockIdx.x counts down), so a CTA only waits for CTAs launched before
// it: waiting relies on CTAs starting in block order (the hardware's, not a CUDA guarantee).
struct DqTurns {
  const BwdKernelParams* p;
  int b, kvh, key_tile;
  TileRange qt;
  Step* next;

  __device__ __forceinline__ int* counter(Step st) const {
    const int num_query_tiles = (p->mask.T + kBwdQueries - 1) / kBwdQueries;
    return p->dq_turns + (int64_t(b) * p->N + kvh * p->group + st.hh) * num_query_tiles + st.m;
  }
  // Waits until query tile st.m's counter reaches this key tile's turn; ld.acquire orders the
  // CTA's adds (after a CTA barrier) after the previous key tiles' adds.
  __device__ __forceinline__ void wait(Step st) const {
    const int turn = key_tiles(p->mask, st.m * kBwdQueries, kBwdQueries, kBwdKeys).end - 1 - key_tile;
    const int* c = counter(st);
    for (;;) {
      int done;
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(done) : "l"(c) : "memory");
      if (done >= turn) return;
      __nanosleep(100);
    }
  }
  // Hands st's turn on (after a CTA barrier that follows the adds) and moves past st.
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

// P^T of one thread's accumulator fragment: its keys key_a and key_a + 8 (rows) times the
// step's queries q0 + 8 nb + 2 t4 + {0, 1} (columns), in the layout mma.sync m16n8 and wgmma
// m64nN accumulators share. st holds S^T on entry and P^T = exp2(S^T * scale * log2e - lse2) on
// return, zero where the query does not see the key (partial tiles: two compares per element,
// block-mask lookups only for tiles that straddle mask blocks). lse2: the step's row statistic.
template <int NB>
__device__ __forceinline__ void probabilities(float (&st)[NB][4], const BwdKernelParams& p,
                                              const float* lse2, bool partial, const uint8_t* mask,
                                              int q0, int key_a, int t4,
                                              const Interval (&key_queries)[2]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      st[nb][v] = fast_exp2(st[nb][v] * p.scale_log2 - lse2[nb * 8 + 2 * t4 + (v & 1)]);
    }
  }
  if (!partial) return;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = q0 + nb * 8 + 2 * t4 + (v & 1);
      const Interval& r = key_queries[v >> 1];
      st[nb][v] = (i >= r.lo && i <= r.hi) ? st[nb][v] : 0.f;
    }
  }
  if (!mask) return;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = q0 + nb * 8 + 2 * t4 + (v & 1), j = key_a + 8 * (v >> 1);
      if (st[nb][v] != 0.f && !block_on(p.mask, mask, i, j)) st[nb][v] = 0.f;
    }
  }
}

// dS^T = P^T (dP^T - delta) in place of dP^T, same fragment layout.
template <int NB>
__device__ __forceinline__ void dscores(const float (&pt)[NB][4], float (&dpt)[NB][4],
                                        const float* delta, int t4) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int v = 0; v < 4; ++v) dpt[nb][v] = pt[nb][v] * (dpt[nb][v] - delta[nb * 8 + 2 * t4 + (v & 1)]);
  }
}

// P^T and dS^T as 16-bit A fragments (16 keys x 16 queries per k-step), and dS^T into the
// shared tile ds_tile (kBwdKeys rows of kBwdQueries queries) for the dQ product: fragment
// register 2 * half + ri holds the tile's key row key_row + 8 ri, query columns
// (2 kk + half) * 8 + 2 t4 + {0, 1}.
template <bool kBf16>
__device__ __forceinline__ void pack_p_ds(const float (&p_t)[kBwdQueries / 8][4],
                                          const float (&ds_t)[kBwdQueries / 8][4],
                                          uint32_t (&pa)[kBwdQueries / 16][4],
                                          uint32_t (&da)[kBwdQueries / 16][4], uint32_t ds_tile,
                                          int key_row, int t4) {
#pragma unroll
  for (int kk = 0; kk < kBwdQueries / 16; ++kk) {
    pack_a<kBf16>(pa[kk], p_t, kk);
    pack_a<kBf16>(da[kk], ds_t, kk);
  }
#pragma unroll
  for (int kk = 0; kk < kBwdQueries / 16; ++kk) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const int r = key_row + 8 * (reg & 1), col = (2 * kk + (reg >> 1)) * 8;
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(tile_addr(ds_tile, kBwdKeys, r, col) + 4 * t4),
                   "r"(da[kk][reg]) : "memory");
    }
  }
}

// Epilogue: dK = scale * sum dS^T Q, dV = sum P^T dO for this thread's keys key_a, key_a + 8
// (< S; every key row is written, also in key tiles that no query sees), columns 8 nb + 2 t4 +
// {0, 1}: 16-bit, or fp32 into dk_accum / dv_accum in accumulation mode.
template <bool kBf16, int D>
__device__ __forceinline__ void store_dk_dv(const BwdKernelParams& p, const float (&dk)[D / 8][4],
                                            const float (&dv)[D / 8][4], int b, int kvh, int key_a,
                                            int t4) {
  using Elem = typename Elem16<kBf16>::type;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int j = key_a + 8 * ri;
    if (j >= p.mask.S) continue;
    const int64_t off = ((int64_t(b) * p.mask.S + j) * p.K + kvh) * D + 2 * t4;
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

// Adds this thread's dQ fragment (rows q0 + row_a, q0 + row_a + 8 of query head h, columns
// col0 + 8 nb + 2 t4 + {0, 1}) into the fp32 dq_accum; rows past T are skipped.
template <int D, int NB>
__device__ __forceinline__ void add_dq(const BwdKernelParams& p, const float (&dq)[NB][4], int b,
                                       int h, int q0, int row_a, int col0, int t4) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int i = q0 + row_a + 8 * ri;
    if (i >= p.mask.T) continue;
    float2* row = reinterpret_cast<float2*>(
        p.dq_accum + ((int64_t(b) * p.mask.T + i) * p.N + h) * D + col0 + 2 * t4);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) atomicAdd(row + nb * 4, make_float2(dq[nb][2 * ri], dq[nb][2 * ri + 1]));
  }
}

// Launches one of a kernel file's instantiations (the deterministic one when l asks for it)
// with the operands every backward kernel takes.
template <typename Kernel>
cudaError_t LaunchBwdKernel(Kernel kernel, Kernel deterministic_kernel, int threads, int smem,
                            const BwdLaunch& l, cudaStream_t stream) {
  if (l.deterministic) kernel = deterministic_kernel;
  const cudaError_t err = EnsureSmem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<l.grid, threads, smem, stream>>>(l.tm_q, l.tm_k, l.tm_v, l.tm_do, l.params);
  return cudaGetLastError();
}

}  // namespace jax_sparsek::cuda
