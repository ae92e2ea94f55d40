// XLA FFI binding of the CPU decode kernel (jax_sparsek_decode_fwd, contract in
// ffi_bindings.h): one pass over the cache per (batch, query head) with an online softmax.
#include <cmath>
#include <limits>
#include <vector>

#include "common/ffi_helpers.h"
#include "common/registry.h"
#include "decode/ffi_bindings.h"

namespace jax_sparsek::decode {
namespace {

template <typename T>
void DecodeForward(const DecodeShape& s, float scale, const T* q, const T* k, const T* v,
                   const float* key_weight, T* o, float* lse) {
  const int64_t group = s.N / s.K;
  ParallelFor(s.B * s.N, [&](int64_t bh) {
    const int64_t b = bh / s.N, h = bh % s.N, kv = h / group;
    const int64_t base = b * s.batch_stride + kv * s.head_stride;
    const float* w_row = key_weight ? key_weight + (b * s.K + kv) * s.R : nullptr;
    std::vector<float> q_row(s.D), acc(s.D, 0.0f);  // q in float32, read once per cache row
    for (int64_t d = 0; d < s.D; ++d) q_row[d] = ToFloat(q[bh * s.D + d]);
    float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
    for (int64_t r = s.key_begin; r < s.R; ++r) {
      const float w = w_row ? w_row[r] : 1.0f;
      if (!(w > 0.0f)) continue;
      const T* k_row = k + base + r * s.entry_stride;
      const T* v_row = v + base + r * s.entry_stride;
      float dot = 0.0f;
      for (int64_t d = 0; d < s.D; ++d) dot += q_row[d] * ToFloat(k_row[d]);
      const float x = scale * dot, m_new = std::max(m, x);
      const float rescale = std::exp(m - m_new), p = w * std::exp(x - m_new);
      l = l * rescale + p;
      for (int64_t d = 0; d < s.D; ++d) acc[d] = acc[d] * rescale + p * ToFloat(v_row[d]);
      m = m_new;
    }
    for (int64_t d = 0; d < s.D; ++d) o[bh * s.D + d] = FromFloat<T>(l > 0.0f ? acc[d] / l : 0.0f);
    lse[bh] = l > 0.0f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
  });
}

ffi::Error DecodeForwardCpu(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::AnyBuffer key_weight, ffi::Result<ffi::AnyBuffer> o,
                            ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> partials,
                            float scale, int64_t key_begin, bool heads_first) {
  DecodeShape s;
  JSK_RETURN_IF_ERROR(ReadDecodeShape(q, k, v, key_weight, *o, *lse, *partials, scale, key_begin,
                                      heads_first, &s));
  const float* weights = s.weighted ? static_cast<const float*>(key_weight.untyped_data()) : nullptr;
  const bool known = DispatchFloat(q.element_type(), [&](auto tag) {
    using T = decltype(tag);
    DecodeForward<T>(s, scale, static_cast<const T*>(q.untyped_data()),
                     static_cast<const T*>(k.untyped_data()), static_cast<const T*>(v.untyped_data()),
                     weights, static_cast<T*>(o->untyped_data()), static_cast<float*>(lse->untyped_data()));
  });
  if (!known)
    return ffi::Error::InvalidArgument(std::string("decode attention takes float32, bfloat16 or "
                                                   "float16 q/k/v, got ") + DtypeName(q.element_type()));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDecodeForwardCpu, DecodeForwardCpu, ForwardBinding(ffi::Ffi::Bind()));

}  // namespace

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_decode_fwd", "cpu", kDecodeForwardCpu);

}  // namespace jax_sparsek::decode
