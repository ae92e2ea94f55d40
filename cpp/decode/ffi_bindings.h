// The FFI contract of jax_sparsek_decode_fwd, written once for the CPU and CUDA handlers: one
// query per (batch, head) against a cache of R entries, with optional per-entry weights.
//
//   q [B, 1, N, D], k / v [B, R, K, D] (heads_first=false, the attention layout) or
//   [B, K, R, D] (heads_first=true, a decode cache's layout), key_weight f32 [B, K, R] or [0]
//   -> o [B, 1, N, D] (q's dtype), lse f32 [B, N, 1], partials f32 [B, N, splits, D + 1]
//   attributes: scale f32, key_begin i64 (entries before it are not read)
//
// Query head h reads kv head h / (N / K). Entry r of kv head kv has weight w = key_weight[b,
// kv, r] (1 without weights): o = sum_r w e^{s_r} v_r / sum_r w e^{s_r} over the entries
// r >= key_begin with w > 0, s_r = scale q.k_r; lse = log sum_r w e^{s_r}. A query with no
// such entry gets o = 0 and lse = -inf. Weights are gates, in [0, 1]: much larger ones can
// overflow the sums. `partials` is the CUDA kernel's split workspace (one row per split of
// the entries: o of the split, then its log2-domain lse; at most max(1, ceil(R / 64)) splits);
// the CPU handler leaves it untouched.
#pragma once

#include <string>
#include <utility>

#include "common/attention_checks.h"
#include "common/ffi_helpers.h"
#include "decode/splits.h"
#include "xla/ffi/api/ffi.h"

namespace jax_sparsek::decode {

namespace ffi = xla::ffi;

template <typename Binding>
auto ForwardBinding(Binding&& bind) {
  return std::move(bind).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()                    // k
      .template Arg<ffi::AnyBuffer>()                    // v
      .template Arg<ffi::AnyBuffer>()                    // key_weight
      .template Ret<ffi::AnyBuffer>()                    // o
      .template Ret<ffi::AnyBuffer>()                    // lse
      .template Ret<ffi::AnyBuffer>()                    // partials
      .template Attr<float>("scale")
      .template Attr<int64_t>("key_begin")
      .template Attr<bool>("heads_first");
}

// Sizes and element strides of one checked call. Entry r of (batch b, kv head kv) starts at
// element b * batch_stride + kv * head_stride + r * entry_stride of k and of v.
struct DecodeShape {
  int64_t B, N, K, R, D, splits, key_begin;
  int64_t batch_stride, head_stride, entry_stride;
  bool weighted;
};

inline ffi::Error ReadDecodeShape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                  const ffi::AnyBuffer& v, const ffi::AnyBuffer& key_weight,
                                  const ffi::AnyBuffer& o, const ffi::AnyBuffer& lse,
                                  const ffi::AnyBuffer& partials, float scale, int64_t key_begin,
                                  bool heads_first, DecodeShape* s) {
  auto str = [](int64_t x) { return std::to_string(x); };
  int64_t qd[4], kd[4], pd[4];
  JSK_RETURN_IF_ERROR(GetDims("q", q, qd));
  JSK_RETURN_IF_ERROR(GetDims("k", k, kd));
  if (qd[1] != 1)
    return ffi::Error::InvalidArgument("decode attention takes one query per sequence: q must "
                                       "have shape [B, 1, N, D], got " + ShapeString(q.dimensions()));
  const int64_t B = qd[0], N = qd[2], D = qd[3];
  const int64_t K = heads_first ? kd[1] : kd[2], R = heads_first ? kd[2] : kd[1];
  const char* layout = heads_first ? "[B, K, R, D]" : "[B, R, K, D]";
  if (kd[0] != B || kd[3] != D || K < 1 || N % K != 0)
    return ffi::Error::InvalidArgument(std::string("k must have shape ") + layout + " with B=" +
                                       str(B) + ", D=" + str(D) + " and K dividing N=" + str(N) +
                                       ", got " + ShapeString(k.dimensions()));
  JSK_RETURN_IF_ERROR(ExpectShape("v", v, {kd[0], kd[1], kd[2], kd[3]}));
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return ffi::Error::InvalidArgument(std::string("q, k and v must share one dtype, got ") +
                                       DtypeName(q.element_type()) + ", " +
                                       DtypeName(k.element_type()) + ", " + DtypeName(v.element_type()));
  const bool weighted = key_weight.element_count() != 0;
  if (weighted) {
    JSK_RETURN_IF_ERROR(ExpectShape("key_weight", key_weight, {B, K, R}));
    JSK_RETURN_IF_ERROR(ExpectDtype("key_weight", key_weight, ffi::DataType::F32));
  }
  if (key_begin < 0)
    return ffi::Error::InvalidArgument("key_begin must be >= 0, got " + str(key_begin));
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(AttentionShape{B, 1, R, N, K, D, D},
                                            q.element_type(), o, lse));
  JSK_RETURN_IF_ERROR(GetDims("partials", partials, pd));
  const int64_t max_splits = std::max<int64_t>(1, (R + kSplitEntries - 1) / kSplitEntries);
  if (pd[0] != B || pd[1] != N || pd[2] < 1 || pd[2] > max_splits || pd[3] != D + 1)
    return ffi::Error::InvalidArgument("partials must have shape [B=" + str(B) + ", N=" + str(N) +
                                       ", splits in [1, " + str(max_splits) + "], D + 1=" +
                                       str(D + 1) + "], got " + ShapeString(partials.dimensions()));
  JSK_RETURN_IF_ERROR(ExpectDtype("partials", partials, ffi::DataType::F32));
  *s = DecodeShape{B, N, K, R, D, pd[2], key_begin,
                   /*batch_stride=*/R * K * D,
                   /*head_stride=*/heads_first ? R * D : D,
                   /*entry_stride=*/heads_first ? D : K * D, weighted};
  return ffi::Error::Success();
}

}  // namespace jax_sparsek::decode
