// Argument checks of the SparseK targets shared by the CPU and CUDA handlers: attributes,
// shapes and dtypes (never the values inside device buffers).
#pragma once

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <string>

#include "common/attention_checks.h"
#include "common/ffi_helpers.h"

namespace jax_sparsek::sparsek {

inline ffi::Error CheckSelectionAttrs(int64_t k_select, int64_t window) {
  if (k_select < 1)
    return ffi::Error::InvalidArgument("k_select must be >= 1, got " + std::to_string(k_select));
  if (window < 0)
    return ffi::Error::InvalidArgument("window must be >= 0, got " + std::to_string(window));
  return ffi::Error::Success();
}

inline ffi::Error CheckLike(const char* what, const ffi::AnyBuffer& buf, ffi::DataType dtype,
                           std::initializer_list<int64_t> shape) {
  JSK_RETURN_IF_ERROR(ExpectDtype(what, buf, dtype));
  return ExpectShape(what, buf, shape);
}

// The shape [B, S, K] of float32 scores.
inline ffi::Error ReadScoresShape(const ffi::AnyBuffer& scores, int64_t* B, int64_t* S, int64_t* K) {
  int64_t sd[3] = {};
  JSK_RETURN_IF_ERROR(GetDims("scores", scores, sd));
  JSK_RETURN_IF_ERROR(ExpectDtype("scores", scores, ffi::DataType::F32));
  *B = sd[0];
  *S = sd[1];
  *K = sd[2];
  return ffi::Error::Success();
}

// q, k, v, scores f32 [B, S, K], and the selection tau f32 / kth s32 [B, K, T] of the T queries,
// plus the attributes; fills the shape read from q, k, v.
inline ffi::Error CheckAttentionArgs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                     const ffi::AnyBuffer& v, const ffi::AnyBuffer& scores,
                                     const ffi::AnyBuffer& tau, const ffi::AnyBuffer& kth,
                                     float scale, int64_t k_select, int64_t window,
                                     AttentionShape* s) {
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, s));
  JSK_RETURN_IF_ERROR(CheckLike("scores", scores, ffi::DataType::F32, {s->B, s->S, s->K}));
  JSK_RETURN_IF_ERROR(CheckSelectionAttrs(k_select, window));
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  JSK_RETURN_IF_ERROR(CheckLike("tau", tau, ffi::DataType::F32, {s->B, s->K, s->T}));
  return CheckLike("kth", kth, ffi::DataType::S32, {s->B, s->K, s->T});
}

// The window as the kernels take it: clipped to S + T (no overflow in p_i + window).
inline int64_t ClippedWindow(int64_t window, int64_t S, int64_t T) { return std::min(window, S + T); }

}  // namespace jax_sparsek::sparsek
