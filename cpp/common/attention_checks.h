// Argument checks shared by the attention FFI handlers (flash / block-sparse on CPU and CUDA,
// SparseK on CPU): read the problem shape from q, k, v and check the operands and results every
// attention op has in common. Each check returns InvalidArgument naming the argument and the
// shape or dtype it must have; op-specific operands (masks, scores, workspaces) and
// backend-specific limits stay with their handlers.
//
// Layouts: q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv], o / do [B, T, N, Dv],
// lse float32 [B, N, T]; dq, dk, dv have the shapes of q, k, v.
#pragma once

#include <cstdint>
#include <string>

#include "common/ffi_helpers.h"

namespace jax_sparsek {

// The sizes of one attention call, as read from q, k and v.
struct AttentionShape {
  int64_t B, T, S, N, K, D, Dv;
};

// Reads the shape from q, k, v (each of rank 4) and checks that k and v agree with q, that the
// query heads are a multiple of the kv heads (GQA) and that q, k, v share one float dtype
// (float32, bfloat16 or float16). The dtype is q.element_type().
inline ffi::Error ReadAttentionShape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                     const ffi::AnyBuffer& v, AttentionShape* s) {
  int64_t qd[4], kd[4], vd[4];
  JSK_RETURN_IF_ERROR(GetDims("q", q, qd));
  JSK_RETURN_IF_ERROR(GetDims("k", k, kd));
  JSK_RETURN_IF_ERROR(GetDims("v", v, vd));
  *s = AttentionShape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3]};
  // S and K come from k itself, so only its batch and head dim can disagree with q.
  if (kd[0] != s->B || kd[3] != s->D)
    return ffi::Error::InvalidArgument("k must have shape [B=" + std::to_string(s->B) +
                                       ", S, K, D=" + std::to_string(s->D) + "], got " +
                                       ShapeString(k.dimensions()));
  JSK_RETURN_IF_ERROR(ExpectShape("v", v, {s->B, s->S, s->K, s->Dv}));
  if (s->K <= 0 || s->N % s->K != 0)
    return ffi::Error::InvalidArgument("the number of query heads N=" + std::to_string(s->N) +
                                       " must be a multiple of the number of kv heads K=" +
                                       std::to_string(s->K));
  const ffi::DataType dtype = q.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16)
    return ffi::Error::InvalidArgument(std::string("q must be float32, bfloat16 or float16, got ") +
                                       DtypeName(dtype));
  JSK_RETURN_IF_ERROR(ExpectDtype("k", k, dtype));
  return ExpectDtype("v", v, dtype);
}

// o [B, T, N, Dv] in the inputs' dtype and lse float32 [B, N, T]: results of the forward,
// operands of the backward.
inline ffi::Error CheckAttentionOutputs(const AttentionShape& s, ffi::DataType dtype,
                                        const ffi::AnyBuffer& o, const ffi::AnyBuffer& lse) {
  JSK_RETURN_IF_ERROR(ExpectShape("o", o, {s.B, s.T, s.N, s.Dv}));
  JSK_RETURN_IF_ERROR(ExpectDtype("o", o, dtype));
  JSK_RETURN_IF_ERROR(ExpectShape("lse", lse, {s.B, s.N, s.T}));
  return ExpectDtype("lse", lse, ffi::DataType::F32);
}

// The backward's incoming gradient do [B, T, N, Dv] and its results dq, dk, dv (shapes of
// q, k, v), all in the inputs' dtype.
inline ffi::Error CheckAttentionGradients(const AttentionShape& s, ffi::DataType dtype,
                                          const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dq,
                                          const ffi::AnyBuffer& dk, const ffi::AnyBuffer& dv) {
  JSK_RETURN_IF_ERROR(ExpectShape("do", dout, {s.B, s.T, s.N, s.Dv}));
  JSK_RETURN_IF_ERROR(ExpectDtype("do", dout, dtype));
  JSK_RETURN_IF_ERROR(ExpectShape("dq", dq, {s.B, s.T, s.N, s.D}));
  JSK_RETURN_IF_ERROR(ExpectDtype("dq", dq, dtype));
  JSK_RETURN_IF_ERROR(ExpectShape("dk", dk, {s.B, s.S, s.K, s.D}));
  JSK_RETURN_IF_ERROR(ExpectDtype("dk", dk, dtype));
  JSK_RETURN_IF_ERROR(ExpectShape("dv", dv, {s.B, s.S, s.K, s.Dv}));
  return ExpectDtype("dv", dv, dtype);
}

}  // namespace jax_sparsek
