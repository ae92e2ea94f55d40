// XLA FFI handler (platform "CUDA") of jax_sparsek_decode_fwd (contract in
// decode/ffi_bindings.h): validation, then the split and merge kernels on XLA's stream. No
// syncs and no allocation: the split workspace (`partials`) is a result XLA allocates.
#include <string>

#include "common/ffi_helpers.h"
#include "common/registry.h"
#include "decode/cuda/decode_kernel.h"
#include "decode/ffi_bindings.h"

namespace jax_sparsek::cuda::decode {
namespace {

namespace ffi = xla::ffi;
using jax_sparsek::decode::DecodeShape;

ffi::Error DecodeForwardCuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer key_weight,
                             ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                             ffi::Result<ffi::AnyBuffer> partials, float scale, int64_t key_begin,
                             bool heads_first) {
  DecodeShape s;
  JSK_RETURN_IF_ERROR(jax_sparsek::decode::ReadDecodeShape(q, k, v, key_weight, *o, *lse, *partials,
                                                           scale, key_begin, heads_first, &s));
  const ffi::DataType dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)
    return ffi::Error::InvalidArgument(std::string("the CUDA decode kernel takes bfloat16 or "
                                                   "float16 q/k/v, got ") + DtypeName(dt));
  if (s.D != 64 && s.D != 128)
    return ffi::Error::InvalidArgument("the CUDA decode kernel takes head dim 64 or 128, got " +
                                       std::to_string(s.D));
  const int64_t kMax = int64_t(1) << 30;
  if (s.B >= kMax || s.N >= kMax || s.R >= kMax || s.splits >= kMax)
    return ffi::Error::InvalidArgument("decode shapes exceed the CUDA kernel's 2^30 limit per axis");
  if (s.B * s.N == 0) return ffi::Error::Success();
  DecodeParams p{q.untyped_data(), k.untyped_data(), v.untyped_data(),
                 s.weighted ? static_cast<const float*>(key_weight.untyped_data()) : nullptr,
                 o->untyped_data(), static_cast<float*>(lse->untyped_data()),
                 static_cast<float*>(partials->untyped_data()),
                 int(s.B), int(s.N), int(s.K), int(s.R), int(s.D), int(s.splits),
                 int(std::min(s.key_begin, s.R)), s.batch_stride, s.head_stride, s.entry_stride, scale};
  const cudaError_t err = LaunchDecode(p, dt == ffi::DataType::BF16, stream);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("decode attention launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    kDecodeForwardCuda, DecodeForwardCuda,
    jax_sparsek::decode::ForwardBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});

}  // namespace

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_decode_fwd", "CUDA", kDecodeForwardCuda);

}  // namespace jax_sparsek::cuda::decode
