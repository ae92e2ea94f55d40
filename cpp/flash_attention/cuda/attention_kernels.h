// Launch interface of the CUDA attention kernels: plain parameter structs filled by the FFI
// handlers (ffi_handlers.cu) and one launcher per pass. Launchers enqueue on `stream`, never
// synchronize and return the launch error (cudaSuccess when all went in).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "masking.cuh"

namespace jax_sparsek::cuda {

// log2(e): the kernels run softmax in base 2, exp(x) = exp2(x * kLog2e).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;  // and back: the lse outputs are natural logs

// Shapes of one attention call; layouts are q/o [B,T,N,D], k/v [B,S,K,D], lse [B,N,T].
struct AttentionDims {
  int B, T, S, N, K, D;
  int group() const { return N / K; }  // query heads per kv head
};

struct FwdArgs {
  AttentionDims dims;
  MaskSpec mask;
  bool bf16;
  float scale;
  const void *q, *k, *v;
  void* o;
  float* lse;
};

struct BwdArgs {
  AttentionDims dims;
  MaskSpec mask;
  bool bf16;
  float scale;
  // dq bitwise reproducible: the key tiles' dq shares are added one key tile after the other in
  // a fixed order (DqTurns in bwd_common.cuh); the accumulation mode below rejects it.
  bool deterministic = false;
  const void *q, *k, *v, *o, *do_;
  const float* lse;
  void *dq, *dk, *dv;
  float* dq_accum;  // [B,T,N,D] fp32 workspace
  // Accumulation mode (SparseK's window part, which more kernels add to afterwards): when
  // both non-null, fp32 [B,S,K,D] buffers that receive dk (scaled) and dv, every key row written,
  // instead of the 16-bit dk / dv; dq_accum then keeps the unscaled dq sum and dq is not
  // converted (it holds delta on return).
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
};

// Which forward kernel runs: the Hopper warp-specialized wgmma kernel (default) or the
// portable mma.sync kernel (kept as the reference point for the wgmma one).
enum class FwdKernel { kWgmma, kWgmmaNoPingPong, kMmaSync };

cudaError_t LaunchFlashForward(const FwdArgs& args, FwdKernel kernel, cudaStream_t stream,
                               std::string* error);
// The individual forward kernels (fwd_wgmma.cu, fwd_mma.cu); S > 0, B * T * N > 0.
cudaError_t LaunchFwdWgmma(const FwdArgs& args, bool pingpong, cudaStream_t stream, std::string* error);
cudaError_t LaunchFwdMma(const FwdArgs& args, cudaStream_t stream, std::string* error);
cudaError_t LaunchFlashBackward(const BwdArgs& args, cudaStream_t stream, std::string* error);
// dst = scale * src in bfloat16 or float16 (elements a multiple of 4): the backward's fp32
// accumulators in the input dtype.
cudaError_t LaunchScaleTo16Bit(const float* src, void* dst, int64_t elements, float scale, bool bf16,
                               cudaStream_t stream);

// Builds a 4-D TMA map {D, seq, heads, batch} over a [batch, seq, heads, D] 16-bit tensor
// with 64x64 boxes and 128-byte swizzle (tma.cu).
bool MakeTensorMap(CUtensorMap* map, const void* ptr, bool bf16, int batch, int seq, int heads,
                   int dim, std::string* error);

// Opts the kernel into `bytes` of dynamic shared memory on the current device, once per
// device and kernel (tma.cu).
cudaError_t EnsureSmem(const void* kernel, int bytes);

}  // namespace jax_sparsek::cuda
