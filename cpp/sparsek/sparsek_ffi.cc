// XLA FFI handlers of SparseK attention on the CPU. The CUDA handlers (cpp/sparsek/cuda/) bind
// the same three targets with the same operands, results and attributes.
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

#include "common/ffi_helpers.h"
#include "common/registry.h"
#include "sparsek/sparsek_cpu.h"

namespace jax_sparsek::sparsek {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

ffi::Error CheckSelectionAttrs(int64_t k_select, int64_t window) {
  if (k_select < 1) return ffi::Error::InvalidArgument("k_select must be >= 1, got " + Str(k_select));
  if (window < 0) return ffi::Error::InvalidArgument("window must be >= 0, got " + Str(window));
  return ffi::Error::Success();
}

ffi::Error CheckScores(const ffi::AnyBuffer& scores, int64_t B, int64_t S, int64_t K) {
  JSK_RETURN_IF_ERROR(ExpectDtype("scores", scores, ffi::DataType::F32));
  return ExpectShape("scores", scores, {B, S, K});
}

// q, k, v shapes and dtypes, scores, and the selection (tau, kth) of the T queries.
ffi::Error CheckAttention(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                          const ffi::AnyBuffer& v, const ffi::AnyBuffer& scores,
                          const ffi::AnyBuffer& tau, const ffi::AnyBuffer& kth, float scale,
                          int64_t k_select, int64_t window, bool causal, Problem* p) {
  int64_t qd[4] = {}, kd[4] = {}, vd[4] = {};
  JSK_RETURN_IF_ERROR(GetDims("q", q, qd));
  JSK_RETURN_IF_ERROR(GetDims("k", k, kd));
  JSK_RETURN_IF_ERROR(GetDims("v", v, vd));
  *p = Problem{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3], k_select, window, causal, scale};
  p->window = std::min(window, p->S + p->T);  // the same keys, no overflow in p_i + window
  if (kd[0] != p->B || kd[3] != p->D)
    return ffi::Error::InvalidArgument("k must have shape [B=" + Str(p->B) + ", S, K, D=" +
                                       Str(p->D) + "], got " + ShapeString(k.dimensions()));
  JSK_RETURN_IF_ERROR(ExpectShape("v", v, {p->B, p->S, p->K, p->Dv}));
  if (p->K <= 0 || p->N % p->K != 0)
    return ffi::Error::InvalidArgument("the number of query heads N=" + Str(p->N) +
                                       " must be a multiple of the number of kv heads K=" + Str(p->K));
  const ffi::DataType dtype = q.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16)
    return ffi::Error::InvalidArgument(std::string("q must be float32, bfloat16 or float16, got ") +
                                       DtypeName(dtype));
  JSK_RETURN_IF_ERROR(ExpectDtype("k", k, dtype));
  JSK_RETURN_IF_ERROR(ExpectDtype("v", v, dtype));
  JSK_RETURN_IF_ERROR(CheckScores(scores, p->B, p->S, p->K));
  JSK_RETURN_IF_ERROR(CheckSelectionAttrs(k_select, window));
  if (!std::isfinite(scale))
    return ffi::Error::InvalidArgument("scale must be finite, got " + std::to_string(scale));
  JSK_RETURN_IF_ERROR(ExpectDtype("tau", tau, ffi::DataType::F32));
  JSK_RETURN_IF_ERROR(ExpectShape("tau", tau, {p->B, p->K, p->T}));
  JSK_RETURN_IF_ERROR(ExpectDtype("kth", kth, ffi::DataType::S32));
  JSK_RETURN_IF_ERROR(ExpectShape("kth", kth, {p->B, p->K, p->T}));
  // The kernels index keys by kth: refuse anything that is not a candidate index or -1.
  const int32_t* kth_data = reinterpret_cast<const int32_t*>(kth.untyped_data());
  for (int64_t x = 0; x < p->B * p->K * p->T; ++x) {
    const int64_t i = x % p->T;
    if (kth_data[x] < -1 || kth_data[x] >= p->NumCandidates(i))
      return ffi::Error::InvalidArgument("kth[" + Str(x) + "] = " + Str(kth_data[x]) +
                                         " is not -1 or a candidate key index of query " + Str(i));
  }
  return ffi::Error::Success();
}

ffi::Error CheckLike(const char* what, const ffi::AnyBuffer& buf, ffi::DataType dtype,
                     std::initializer_list<int64_t> shape) {
  JSK_RETURN_IF_ERROR(ExpectDtype(what, buf, dtype));
  return ExpectShape(what, buf, shape);
}

ffi::Error SelectImpl(ffi::AnyBuffer scores, ffi::Result<ffi::AnyBuffer> tau,
                      ffi::Result<ffi::AnyBuffer> kth, int64_t k_select, int64_t window,
                      bool causal, int64_t num_queries) {
  int64_t sd[3] = {};
  JSK_RETURN_IF_ERROR(GetDims("scores", scores, sd));
  JSK_RETURN_IF_ERROR(ExpectDtype("scores", scores, ffi::DataType::F32));
  JSK_RETURN_IF_ERROR(CheckSelectionAttrs(k_select, window));
  if (num_queries < 1)
    return ffi::Error::InvalidArgument("num_queries must be >= 1, got " + Str(num_queries));
  const Problem p{sd[0], num_queries, sd[1], sd[2], sd[2], 0, 0, k_select,
                  std::min(window, sd[1] + num_queries), causal, 1.0f};
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
  Problem p;
  JSK_RETURN_IF_ERROR(CheckAttention(q, k, v, scores, tau, kth, scale, k_select, window, causal, &p));
  const ffi::DataType dtype = q.element_type();
  JSK_RETURN_IF_ERROR(CheckLike("o", *o, dtype, {p.B, p.T, p.N, p.Dv}));
  JSK_RETURN_IF_ERROR(CheckLike("lse", *lse, ffi::DataType::F32, {p.B, p.N, p.T}));
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
  Problem p;
  JSK_RETURN_IF_ERROR(CheckAttention(q, k, v, scores, tau, kth, scale, k_select, window, causal, &p));
  const ffi::DataType dtype = q.element_type();
  JSK_RETURN_IF_ERROR(CheckLike("o", o, dtype, {p.B, p.T, p.N, p.Dv}));
  JSK_RETURN_IF_ERROR(CheckLike("lse", lse, ffi::DataType::F32, {p.B, p.N, p.T}));
  JSK_RETURN_IF_ERROR(CheckLike("do", dout, dtype, {p.B, p.T, p.N, p.Dv}));
  JSK_RETURN_IF_ERROR(CheckLike("dq", *dq, dtype, {p.B, p.T, p.N, p.D}));
  JSK_RETURN_IF_ERROR(CheckLike("dk", *dk, dtype, {p.B, p.S, p.K, p.D}));
  JSK_RETURN_IF_ERROR(CheckLike("dv", *dv, dtype, {p.B, p.S, p.K, p.Dv}));
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekSelectCpu, SelectImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // scores
                                  .Ret<ffi::AnyBuffer>()  // tau
                                  .Ret<ffi::AnyBuffer>()  // kth
                                  .Attr<int64_t>("k_select")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("num_queries"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekFwdCpu, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // scores
                                  .Arg<ffi::AnyBuffer>()  // tau
                                  .Arg<ffi::AnyBuffer>()  // kth
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("k_select")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekBwdCpu, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // scores
                                  .Arg<ffi::AnyBuffer>()  // tau
                                  .Arg<ffi::AnyBuffer>()  // kth
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // do
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dscores
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("k_select")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("causal"));

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_select", "cpu", SparsekSelectCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_fwd", "cpu", SparsekFwdCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_bwd", "cpu", SparsekBwdCpu);

}  // namespace jax_sparsek::sparsek
