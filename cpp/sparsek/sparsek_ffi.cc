// XLA FFI handlers of SparseK attention on the CPU (signatures in ffi_bindings.h). The CUDA
// pipeline (cpp/sparsek/cuda/ffi_handlers.cu) computes the same tau, kth, o, lse and gradients
// through "_cuda" targets that also pass per-tile key lists and workspaces.
//
// Layouts: q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv], o / do [B, T, N, Dv]; q, k, v, o,
// do share one dtype (f32, bf16 or f16); scores f32 [B, S, K]. Query i sits at position
// p_i = i + S - T; query head n reads kv head n / (N / K). SPEC.md section 4 defines the math.
//
// jax_sparsek_sparsek_select
//   operands: scores f32 [B, S, K]
//   attrs:    k_select i64 (>= 1), window i64 (>= 0), causal bool, num_queries i64 (T >= 1)
//   results:  tau f32 [B, K, T]  SparseK threshold of query i's candidates (-inf when query i
//                                has <= k_select candidates); nondecreasing in i
//             kth s32 [B, K, T]  index j of the k_select-th largest candidate of query i in the
//                                (score, index) order (ties: larger j ranks higher), or -1 when
//                                query i has <= k_select candidates (then all are selected, m = 1)
//   Candidates of query i: j <= p_i - window (causal), all keys otherwise (all rows equal).
//
// jax_sparsek_sparsek_fwd
//   operands: q, k, v, scores, tau, kth (as above)
//   attrs:    scale f32, k_select i64, window i64, causal bool
//   results:  o [B, T, N, Dv] (q's dtype), lse f32 [B, N, T] = log sum_j g_ij exp(s_ij)
//             (-inf and o = 0 for a query with no positive gate)
//   Selected set of query i: candidates j with (u_j, j) >= (u_kth, kth) (all when kth = -1);
//   gate g_ij = 1 on the window, clip(u_j - tau_i, 0, 1) on the other selected keys, else 0.
//
// jax_sparsek_sparsek_bwd
//   operands: q, k, v, scores, tau, kth, o, lse, do
//   attrs:    scale, k_select, window, causal (as the forward)
//   results:  dq, dk, dv (q's dtype, shapes of q, k, v), dscores f32 [B, S, K]
//   The backward reads tau and kth from the forward's selection and requires tau to be
//   nondecreasing along T (the selection guarantees it).
#include <algorithm>
#include <cmath>
#include <string>

#include "common/registry.h"
#include "sparsek/checks.h"
#include "sparsek/ffi_bindings.h"
#include "sparsek/sparsek_cpu.h"

namespace jax_sparsek::sparsek {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

// The shared checks plus the values of kth (host memory here): the kernels index keys by it.
ffi::Error CheckAttention(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                          const ffi::AnyBuffer& v, const ffi::AnyBuffer& scores,
                          const ffi::AnyBuffer& tau, const ffi::AnyBuffer& kth, float scale,
                          int64_t k_select, int64_t window, bool causal, AttentionShape* s,
                          Problem* p) {
  JSK_RETURN_IF_ERROR(CheckAttentionArgs(q, k, v, scores, tau, kth, scale, k_select, window, s));
  *p = Problem{s->B, s->T, s->S, s->N, s->K, s->D, s->Dv, k_select,
               ClippedWindow(window, s->S, s->T), causal, scale};
  const int32_t* kth_data = reinterpret_cast<const int32_t*>(kth.untyped_data());
  for (int64_t x = 0; x < p->B * p->K * p->T; ++x) {
    const int64_t i = x % p->T;
    if (kth_data[x] < -1 || kth_data[x] >= p->NumCandidates(i))
      return ffi::Error::InvalidArgument("kth[" + Str(x) + "] = " + Str(kth_data[x]) +
                                         " is not -1 or a candidate key index of query " + Str(i));
  }
  return ffi::Error::Success();
}

ffi::Error SelectImpl(ffi::AnyBuffer scores, ffi::Result<ffi::AnyBuffer> tau,
                      ffi::Result<ffi::AnyBuffer> kth, int64_t k_select, int64_t window,
                      bool causal, int64_t num_queries) {
  int64_t B = 0, S = 0, K = 0;
  JSK_RETURN_IF_ERROR(ReadScoresShape(scores, &B, &S, &K));
  JSK_RETURN_IF_ERROR(CheckSelectionAttrs(k_select, window));
  if (num_queries < 1)
    return ffi::Error::InvalidArgument("num_queries must be >= 1, got " + Str(num_queries));
  const Problem p{B, num_queries, S, K, K, 0, 0, k_select, ClippedWindow(window, S, num_queries),
                  causal, 1.0f};
  JSK_RETURN_IF_ERROR(CheckLike("tau", *tau, ffi::DataType::F32, {p.B, p.K, p.T}));
  JSK_RETURN_IF_ERROR(CheckLike("kth", *kth, ffi::DataType::S32, {p.B, p.K, p.T}));
  SelectCpu(p, reinterpret_cast<const float*>(scores.untyped_data()),
            reinterpret_cast<float*>(tau->untyped_data()),
            reinterpret_cast<int32_t*>(kth->untyped_data()));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer scores,
                       ffi::AnyBuffer tau, ffi::AnyBuffer kth, ffi::Result<ffi::AnyBuffer> o,
                       ffi::Result<ffi::AnyBuffer> lse, float scale, int64_t k_select,
                       int64_t window, bool causal) {
  AttentionShape s;
  Problem p;
  JSK_RETURN_IF_ERROR(
      CheckAttention(q, k, v, scores, tau, kth, scale, k_select, window, causal, &s, &p));
  const ffi::DataType dtype = q.element_type();
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(s, dtype, *o, *lse));
  DispatchFloat(dtype, [&](auto zero) {
    using T = decltype(zero);
    ForwardCpu<T>(p, reinterpret_cast<const T*>(q.untyped_data()),
                  reinterpret_cast<const T*>(k.untyped_data()),
                  reinterpret_cast<const T*>(v.untyped_data()),
                  reinterpret_cast<const float*>(scores.untyped_data()),
                  reinterpret_cast<const float*>(tau.untyped_data()),
                  reinterpret_cast<const int32_t*>(kth.untyped_data()),
                  reinterpret_cast<T*>(o->untyped_data()), reinterpret_cast<float*>(lse->untyped_data()));
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer scores, ffi::AnyBuffer tau, ffi::AnyBuffer kth,
                        ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                        ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dscores,
                        float scale, int64_t k_select, int64_t window, bool causal) {
  AttentionShape s;
  Problem p;
  JSK_RETURN_IF_ERROR(
      CheckAttention(q, k, v, scores, tau, kth, scale, k_select, window, causal, &s, &p));
  const ffi::DataType dtype = q.element_type();
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(s, dtype, o, lse));
  JSK_RETURN_IF_ERROR(CheckAttentionGradients(s, dtype, dout, *dq, *dk, *dv));
  JSK_RETURN_IF_ERROR(CheckLike("dscores", *dscores, ffi::DataType::F32, {p.B, p.S, p.K}));
  DispatchFloat(dtype, [&](auto zero) {
    using T = decltype(zero);
    BackwardCpu<T>(p, reinterpret_cast<const T*>(q.untyped_data()),
                   reinterpret_cast<const T*>(k.untyped_data()),
                   reinterpret_cast<const T*>(v.untyped_data()),
                   reinterpret_cast<const float*>(scores.untyped_data()),
                   reinterpret_cast<const float*>(tau.untyped_data()),
                   reinterpret_cast<const int32_t*>(kth.untyped_data()),
                   reinterpret_cast<const T*>(o.untyped_data()),
                   reinterpret_cast<const float*>(lse.untyped_data()),
                   reinterpret_cast<const T*>(dout.untyped_data()),
                   reinterpret_cast<T*>(dq->untyped_data()), reinterpret_cast<T*>(dk->untyped_data()),
                   reinterpret_cast<T*>(dv->untyped_data()),
                   reinterpret_cast<float*>(dscores->untyped_data()));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekSelectCpu, SelectImpl, SelectBinding<false>(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekFwdCpu, ForwardImpl, ForwardBinding<false>(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekBwdCpu, BackwardImpl, BackwardBinding<false>(ffi::Ffi::Bind()));

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_select", "cpu", SparsekSelectCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_fwd", "cpu", SparsekFwdCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_bwd", "cpu", SparsekBwdCpu);

}  // namespace jax_sparsek::sparsek
