// Thin inline-PTX wrappers shared by the attention kernels (sm_90a): mma.sync and ldmatrix
// for the warp-level kernels, mbarrier + TMA (cp.async.bulk.tensor) for tile loads, named
// barriers, cp.async row gathers, fast exp2, and 16-bit packing. The wgmma wrappers live in wgmma.cuh.
#pragma once

#include <cuda.h>  // CUtensorMap (types only: the driver entry point is fetched at run time)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_sparsek::cuda {

// ---- 16-bit element types -------------------------------------------------------------
// kBf16 selects the instruction variants; Elem is the storage type.
template <bool kBf16> struct Elem16;
template <> struct Elem16<false> { using type = __half; };
template <> struct Elem16<true> { using type = __nv_bfloat16; };

// Packs two floats into one 32-bit register of two 16-bit values (lo = first column).
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (kBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

template <bool kBf16>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (kBf16) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  } else {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    return __half22float2(h);
  }
}

// The 16-bit A operand (this warp's 16 rows x columns 16 kk .. 16 kk + 15) of an fp32
// accumulator tile x (rows g / g + 8, columns 8 nb + 2 t4 + {0, 1} at x[nb][0..1] / x[nb][2..3];
// mma.sync m16n8 and wgmma m64nN accumulators agree per warp).
template <bool kBf16, int NB>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&x)[NB][4], int kk) {
  a[0] = pack2<kBf16>(x[2 * kk][0], x[2 * kk][1]);
  a[1] = pack2<kBf16>(x[2 * kk][2], x[2 * kk][3]);
  a[2] = pack2<kBf16>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = pack2<kBf16>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- warp-level tensor cores (mma.sync m16n8k16, fp32 accumulate) --------------------
// c[0..1]: row g, cols 2t, 2t+1; c[2..3]: row g+8 (g = lane/4, t = lane%4).
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- cp.async (gathers of rows by index, where TMA's boxes do not apply) ---------------
// Copies 16 bytes global -> shared, or writes 16 zero bytes when !valid (src is then unread).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
// The same for 4 bytes (one score per gathered key).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until every cp.async of this thread has landed, committed to a group or not.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// ---- the shared-memory tile format --------------------------------------------------
// Every [rows x cols] 16-bit tile (cols = 64 or 128) is stored as cols/64 column panels of
// [rows][64] elements, each row 128 bytes, with the 128-byte swizzle that TMA writes and
// wgmma reads (16-byte chunk c of row r sits at chunk c ^ (r % 8)). Tiles start 1024-byte
// aligned and have a multiple of 8 rows. Returns the byte address of element (r, c), c % 8 == 0.
__device__ __forceinline__ uint32_t tile_addr(uint32_t base, int rows, int r, int c) {
  return base + (c >> 6) * rows * 128 + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4);
}

// ---- mbarrier -------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.b32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// Arrives on `bar` once every cp.async this thread issued before it has landed; the arrival
// counts toward the barrier's expected count (.noinc).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

// ---- TMA (bulk tensor copies) -----------------------------------------------------------
// All tensors are 4-D maps {inner dim, sequence, head, batch} with 128-byte swizzle and
// 64-element x 64-row boxes (8 KiB).
constexpr int kBoxCols = 64;
constexpr int kBoxRows = 64;
constexpr uint32_t kBoxBytes = kBoxCols * kBoxRows * 2;

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int c0, int c1,
                                             int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void tma_store_commit_and_wait() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// Orders ordinary (generic-proxy) shared-memory accesses before this thread's later async-proxy
// ones (TMA, wgmma): after this thread's own writes (the O staging before a TMA store), or after
// a barrier wait that made other threads' writes visible (cp.async rows before wgmma reads).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Loads the [kRows x kCols] tile (multiples of 64) starting at sequence row `row0` of one
// (batch, head) of `map` into the swizzled tile at `dst`; rows past the end are zero-filled.
// One thread calls it; `bar` must expect kRows * kCols * 2 bytes.
template <int kRows, int kCols>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                              int row0, int head, int batch) {
#pragma unroll
  for (int p = 0; p < kCols / kBoxCols; ++p) {
#pragma unroll
    for (int rb = 0; rb < kRows / kBoxRows; ++rb) {
      tma_load_4d(dst + p * kRows * 128 + rb * kBoxRows * 128, map, bar, p * kBoxCols,
                  row0 + rb * kBoxRows, head, batch);
    }
  }
}

// ---- named barriers (id 0 is __syncthreads) -----------------------------------------------
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace jax_sparsek::cuda
