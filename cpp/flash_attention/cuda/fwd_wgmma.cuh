// The pieces of a warp-specialized wgmma forward (fwd_wgmma.cu's design) that the flash
// forward and the SparseK forward (sparsek/cuda/fwd_gather.cu) share: the register split
// between producer and consumer warpgroups, the two GEMMs of one 128-key step for a consumer's
// 64 query rows, the consumers' mainloop, and the epilogue that stores O through a TMA map.
#pragma once

#include "fwd_common.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace jax_sparsek::cuda {

// Keys per step (the n of the m64n128 wgmma) and query rows per CTA (two consumers of 64).
constexpr int kWgmmaKeys = 128, kWgmmaRows = 128;

// The CTA: a producer warpgroup and two consumer warpgroups. Register split: the launch gives
// every thread (65536 / 384) rounded down to the allocation unit of 8 = 168 registers;
// setmaxnreg.inc waits until the producer's setmaxnreg.dec has freed enough of them, so a split
// that needs more never starts.
constexpr int kWgmmaThreads = 384, kProducerRegs = 24, kConsumerRegs = 240;
static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * (65536 / kWgmmaThreads / 8 * 8),
              "the consumers' setmaxnreg.inc would wait forever");
// Named barrier ids: 1 + c = consumer c's turn to issue GEMMs; 3 + c = consumer c's epilogue.
constexpr int kBarTurn = 1, kBarEpilogue = 3;

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// A consumer thread's place: consumer c (warpgroup c + 1) holds query rows [64 c, 64 c + 64) of
// the tile; in the accumulator layout the thread holds rows `row` and `row + 8` of the tile and
// columns 8 j + 2 t4 + {0, 1}.
struct ConsumerThread {
  int c, tid_c, t4, row;
  __device__ __forceinline__ explicit ConsumerThread(int tid)
      : c(tid / 128 - 1), tid_c(tid % 128), t4(tid % 4),
        row(c * 64 + (tid_c / 32) * 16 + (tid % 32) / 4) {}
  // This consumer's rows of the kWgmmaRows-row Q tile at sQ (panel 0 of the tile format).
  __device__ __forceinline__ uint32_t q_rows(uint32_t sQ) const { return sQ + c * 64 * 128; }
};

// S = Q K^T for one consumer: 64 rows of Q (q_rows: this consumer's rows in panel 0 of the
// kWgmmaRows-row Q tile) times the 128-key tile, D/16 wgmmas, one commit group.
template <bool kBf16, int D>
__device__ __forceinline__ void issue_qk(float (&s)[kWgmmaKeys / 8][4], uint32_t q_rows,
                                         uint32_t k_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = (kk / 4) * kWgmmaKeys * 128 + (kk % 4) * 32;  // panel, 16-column step
    const uint64_t da = wgmma_desc(q_rows + (kk / 4) * kWgmmaRows * 128 + (kk % 4) * 32, 16, 1024);
    const uint64_t db = wgmma_desc(k_tile + koff, 16, 1024);
    wgmma_m64n128k16_ss<kBf16>(reinterpret_cast<float(&)[kWgmmaKeys / 2]>(s), da, db, kk > 0);
  }
  wgmma_commit();
}

// O += P V: P (64 x 128, registers) times the 128 x D value tile (MN-major: one key per
// 128-byte row, D/64 panels kWgmmaKeys * 128 bytes apart).
template <bool kBf16, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], uint32_t (&pf)[kWgmmaKeys / 16][4],
                                         uint32_t v_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kWgmmaKeys / 16; ++kk) {
    const uint64_t db = wgmma_desc(v_tile + kk * 16 * 128, kWgmmaKeys * 128, 1024);
    if constexpr (D == 128) {
      wgmma_m64n128k16_rs<kBf16>(reinterpret_cast<float(&)[64]>(o), pf[kk], db, 1);
    } else {
      wgmma_m64n64k16_rs<kBf16>(reinterpret_cast<float(&)[32]>(o), pf[kk], db, 1);
    }
  }
  wgmma_commit();
}

// Accumulator-layout probabilities -> A-operand fragments (16 keys per wgmma k-step).
template <bool kBf16>
__device__ __forceinline__ void convert_p(const float (&s)[kWgmmaKeys / 8][4],
                                          uint32_t (&pf)[kWgmmaKeys / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kWgmmaKeys / 16; ++kk) pack_a<kBf16>(pf[kk], s, kk);
}

// A consumer's mainloop over the steps it = 0, 1, ... of 128 keys, two stages deep: S_it =
// Q K_it^T and O += P_{it-1} V_{it-1} are issued back to back and the softmax of S_it runs
// while P V is still in flight; with ping-pong the two consumers take turns issuing their GEMMs
// (named barriers kBarTurn + c), so one's softmax runs under the other's GEMMs. Step 0 exists; the
// kernel's `steps` (mainloop_steps of four lambdas) supplies:
//   bool wait_k(it)   waits for stage it & 1's K (and whatever the softmax reads with it);
//                     false when there is no step it;
//   void softmax(it, s, alpha)  the masked online-softmax step of S_it, then the release of
//                     the stage's K;
//   void wait_v(it), release_v(it)  the same for V_it.
template <typename WaitK, typename Softmax, typename WaitV, typename ReleaseV>
struct MainloopSteps {
  WaitK wait_k;
  Softmax softmax;
  WaitV wait_v;
  ReleaseV release_v;
};
template <typename WaitK, typename Softmax, typename WaitV, typename ReleaseV>
__device__ __forceinline__ MainloopSteps<WaitK, Softmax, WaitV, ReleaseV> mainloop_steps(
    WaitK wait_k, Softmax softmax, WaitV wait_v, ReleaseV release_v) {
  return {wait_k, softmax, wait_v, release_v};
}

template <bool kBf16, int D, typename Steps>
__device__ __forceinline__ void consumer_mainloop(float (&o)[D / 8][4], Steps& steps, uint32_t bar_q,
                                                  uint32_t q_rows, uint32_t k_tiles,
                                                  uint32_t v_tiles, uint32_t tile_bytes, int c,
                                                  bool pingpong) {
  float s[kWgmmaKeys / 8][4];
  uint32_t pf[kWgmmaKeys / 16][4];
  float alpha[2] = {1.f, 1.f};
  const int my_turn = kBarTurn + c, other_turn = kBarTurn + (1 - c);
  if (pingpong && c == 1) named_bar_arrive(kBarTurn, 256);  // consumer 0 goes first
  mbar_wait(bar_q, 0);

  // Step 0: S_0 only.
  steps.wait_k(0);
  if (pingpong) named_bar_sync(my_turn, 256);
  issue_qk<kBf16, D>(s, q_rows, k_tiles);
  if (pingpong) named_bar_arrive(other_turn, 256);
  wgmma_wait<0>();
  fence_regs(reinterpret_cast<float(&)[kWgmmaKeys / 2]>(s));
  steps.softmax(0, s, alpha);
  convert_p<kBf16>(s, pf);

  int it = 1;
  for (; steps.wait_k(it); ++it) {
    const int stage = it & 1, prev = stage ^ 1;
    if (pingpong) named_bar_sync(my_turn, 256);
    issue_qk<kBf16, D>(s, q_rows, k_tiles + stage * tile_bytes);
    rescale_rows<D>(o, alpha);
    steps.wait_v(it - 1);
    issue_pv<kBf16, D>(o, pf, v_tiles + prev * tile_bytes);
    if (pingpong) named_bar_arrive(other_turn, 256);

    wgmma_wait<1>();  // S_it is done; P_{it-1} V_{it-1} may still run
    fence_regs(reinterpret_cast<float(&)[kWgmmaKeys / 2]>(s));
    steps.softmax(it, s, alpha);
    wgmma_wait<0>();
    fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
    fence_regs(reinterpret_cast<uint32_t(&)[kWgmmaKeys / 4]>(pf));
    steps.release_v(it - 1);
    convert_p<kBf16>(s, pf);
  }

  // Last P V.
  const int last = it - 1;
  if (pingpong) named_bar_sync(my_turn, 256);
  rescale_rows<D>(o, alpha);
  steps.wait_v(last);
  issue_pv<kBf16, D>(o, pf, v_tiles + (last & 1) * tile_bytes);
  if (pingpong && c == 0) named_bar_arrive(other_turn, 256);  // consumer 1 issues last
  wgmma_wait<0>();
  fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
  fence_regs(reinterpret_cast<uint32_t(&)[kWgmmaKeys / 4]>(pf));
  steps.release_v(last);
}

// Epilogue of consumer ct.c: normalizes O, stages it (16-bit) in the consumer's own rows of the
// Q tile at sQ in the swizzled tile format, and stores the rows [r0 + 64 c, r0 + 64 c + 64) of
// (head h, batch b) with a TMA store (rows past the tensor's end are clipped); then the
// natural-log lse of rows below T.
template <bool kBf16, int D>
__device__ __forceinline__ void store_o_tile(const float (&o)[D / 8][4], const float (&m_run)[2],
                                             const float (&l_run)[2], uint32_t sQ,
                                             const ConsumerThread& ct, const CUtensorMap* tm_o,
                                             int r0, int h, int b, int T, float* lse_bh) {
  float inv[2], lse[2];
  finalize_rows(m_run, l_run, inv, lse);
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const uint32_t addr = tile_addr(sQ, kWgmmaRows, ct.row + 8 * ri, 8 * j) + 4 * ct.t4;
      const uint32_t val = pack2<kBf16>(o[j][2 * ri] * inv[ri], o[j][2 * ri + 1] * inv[ri]);
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(val) : "memory");
    }
  }
  fence_proxy_async();
  named_bar_sync(kBarEpilogue + ct.c, 128);
  if (ct.tid_c == 0) {
    const uint32_t q_rows = ct.q_rows(sQ);
#pragma unroll
    for (int pnl = 0; pnl < D / 64; ++pnl) {
      tma_store_4d(tm_o, q_rows + pnl * kWgmmaRows * 128, pnl * 64, r0 + ct.c * 64, h, b);
    }
    tma_store_commit_and_wait();
  }
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int row = r0 + ct.row + 8 * ri;
    if (ct.t4 == 0 && row < T) lse_bh[row] = lse[ri];
  }
}

}  // namespace jax_sparsek::cuda
