// Launch interface of the CUDA decode kernels (contract: decode/ffi_bindings.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_sparsek::cuda::decode {

struct DecodeParams {
  const void* q;            // [B, N, D]
  const void* k;            // entry r of (b, kv) at b * batch_stride + kv * head_stride + r * entry_stride
  const void* v;            // same layout as k
  const float* key_weight;  // [B, K, R], or nullptr for weight 1 everywhere
  void* o;                  // [B, N, D]
  float* lse;               // [B, N], natural log
  float* partials;          // [B, N, splits, D + 1]; read and written only when splits > 1
  int B, N, K, R, D, splits, key_begin;
  int64_t batch_stride, head_stride, entry_stride;
  float scale;
};

// Splits the entries [key_begin, R) of each (batch, kv head) into `splits` ranges, one CTA per
// range and group of up to four query heads; with splits > 1 a second kernel merges the ranges.
cudaError_t LaunchDecode(const DecodeParams& p, bool bf16, cudaStream_t stream);

}  // namespace jax_sparsek::cuda::decode
