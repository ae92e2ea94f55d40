// The flash backward's launcher: three kernels on one stream,
//   1. bwd_delta_kernel: delta_i = sum_d dO_id O_id per query row (fp32), written into the dq
//      output buffer, which is free until step 3 (2 D >= 128 bytes per row: room for delta and
//      the deterministic mode's counters);
//   2. the main kernel (bwd_common.cuh): bwd_wgmma.cu's on Hopper, or bwd_mma.cu's with
//      JAX_SPARSEK_CUDA_BWD_KERNEL=mma (a developer switch for side-by-side timing): dK and dV
//      per key tile, dQ shares added into the fp32 workspace;
//   3. scale_to_16bit_kernel: dq = scale * dq_accum in the input dtype.
// Accumulation mode (BwdArgs::dk_accum / dv_accum set, used by SparseK's window part): step 2
// stores fp32 dk and dv into those buffers instead, and step 3 is skipped.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "bwd_common.cuh"

namespace jax_sparsek::cuda {
namespace {

constexpr int kBM = kBwdQueries, kBN = kBwdKeys;

bool MmaSyncSelected() {
  const char* env = std::getenv("JAX_SPARSEK_CUDA_BWD_KERNEL");
  return env && std::strcmp(env, "mma") == 0;
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
  if (a.deterministic) {
    dq_turns = reinterpret_cast<int*>(delta + rows);
    const int64_t counters = int64_t(d.B) * d.N * ((d.T + kBM - 1) / kBM);
    if ((err = cudaMemsetAsync(dq_turns, 0, counters * sizeof(int), stream)) != cudaSuccess) return err;
  }
  bwd_delta_kernel<kBf16, D><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const uint16_t*>(a.o), static_cast<const uint16_t*>(a.do_), delta, rows, d.T, d.N);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  BwdLaunch l{kBf16, dq_turns != nullptr, D, dim3((d.S + kBN - 1) / kBN, d.K, d.B)};
  if (!MakeTensorMap(&l.tm_q, a.q, kBf16, d.B, d.T, d.N, D, error) ||
      !MakeTensorMap(&l.tm_k, a.k, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&l.tm_v, a.v, kBf16, d.B, d.S, d.K, D, error) ||
      !MakeTensorMap(&l.tm_do, a.do_, kBf16, d.B, d.T, d.N, D, error)) {
    return cudaErrorInvalidValue;
  }
  l.params = {a.mask, d.N, d.K, d.group(), a.scale, a.scale * kLog2e,
              a.lse, delta, a.dq_accum, dq_turns, a.dk, a.dv, a.dk_accum, a.dv_accum};
  if ((err = MmaSyncSelected() ? LaunchBwdMma(l, stream) : LaunchBwdWgmma(l, stream)) != cudaSuccess) {
    return err;
  }
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
  if (!a.dk_accum != !a.dv_accum || (a.dk_accum && a.deterministic)) {
    *error = "flash backward: accumulation mode takes both dk_accum and dv_accum, and no deterministic dq";
    return cudaErrorInvalidValue;
  }
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
