// wgmma (sm_90a warpgroup MMA) wrappers: shared-memory matrix descriptors, the fence /
// commit / wait protocol, and the instruction shapes the forward and backward kernels issue. The
// instruction wrappers spell out every accumulator register (as CUTLASS's do).
#pragma once

#include <cstdint>

namespace jax_sparsek::cuda {

// Descriptor of a 128-byte-swizzled operand in shared memory (the tile format of ptx.cuh).
// K-major (rows of 64 K-elements): lbo unused (1), sbo = 1024 (8 rows of 128 bytes).
// MN-major (rows of 64 MN-elements, one per K index): lbo = byte stride between 64-column
// panels, sbo = 1024 (8 K-rows).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                               uint32_t sbo_bytes) {
  uint64_t desc = 0;
  desc |= uint64_t((smem_addr & 0x3FFFF) >> 4);
  desc |= uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16;
  desc |= uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32;
  desc |= uint64_t(1) << 62;  // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Pins a register at this point of the instruction stream, so the compiler neither reads an
// accumulator before the wgmma that writes it has been waited for, nor reuses the register
// of an operand an in-flight wgmma still reads.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
template <typename T, int N>
__device__ __forceinline__ void fence_regs(T (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_reg(r[i]);
}

// Each instruction is spelled once, for both input types: TYPE is "bf16" or "f16". The
// accumulator register names and operands of the 64- and 32-register shapes:
#define JSK_ACC32_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define JSK_ACC64_REGS JSK_ACC32_REGS ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define JSK_ACC32_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
  "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define JSK_ACC64_OPERANDS(d) \
  JSK_ACC32_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
  "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), \
  "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), \
  "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// S = Q K^T: A and B both K-major in shared memory.
#define JSK_WGMMA_M64N128K16_SS(TYPE)                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                            \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "        \
               "{" JSK_ACC64_REGS "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                  \
               : JSK_ACC64_OPERANDS(d)                                                  \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kBf16) JSK_WGMMA_M64N128K16_SS("bf16");
  else JSK_WGMMA_M64N128K16_SS("f16");
}

// The backward's 64 x 64 products, both operands in shared memory: S^T = K Q^T and dP^T = V dO^T
// (both K-major: kTrans = 0), and dQ = dS K (dS^T and K stored key-major, i.e. both MN-major:
// kTrans = 1).
#define JSK_WGMMA_M64N64K16_SS(TYPE, TRANS)                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                            \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "         \
               "{" JSK_ACC32_REGS "}, %32, %33, p, 1, 1, " TRANS ", " TRANS ";\n}\n" \
               : JSK_ACC32_OPERANDS(d)                                                  \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <bool kBf16, bool kTrans>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  if constexpr (kBf16 && kTrans) JSK_WGMMA_M64N64K16_SS("bf16", "1");
  else if constexpr (kBf16) JSK_WGMMA_M64N64K16_SS("bf16", "0");
  else if constexpr (kTrans) JSK_WGMMA_M64N64K16_SS("f16", "1");
  else JSK_WGMMA_M64N64K16_SS("f16", "0");
}

// O += P V: A (P) from registers, B (V) MN-major in shared memory (transposed).
#define JSK_WGMMA_M64N128K16_RS(TYPE)                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                            \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "        \
               "{" JSK_ACC64_REGS "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"     \
               : JSK_ACC64_OPERANDS(d)                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  if constexpr (kBf16) JSK_WGMMA_M64N128K16_RS("bf16");
  else JSK_WGMMA_M64N128K16_RS("f16");
}

// O += P V for head dim 64.
#define JSK_WGMMA_M64N64K16_RS(TYPE)                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                            \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "         \
               "{" JSK_ACC32_REGS "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"     \
               : JSK_ACC32_OPERANDS(d)                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  if constexpr (kBf16) JSK_WGMMA_M64N64K16_RS("bf16");
  else JSK_WGMMA_M64N64K16_RS("f16");
}

}  // namespace jax_sparsek::cuda
