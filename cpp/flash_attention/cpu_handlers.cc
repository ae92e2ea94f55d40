// XLA FFI bindings of the CPU attention kernels:
//   jax_sparsek_flash_fwd / _bwd               (causal and window bounds)
//   jax_sparsek_block_sparse_fwd / _bwd        (a block mask, optionally causal)
// Handlers check every shape and dtype and return InvalidArgument on a mismatch.
#include <cmath>
#include <string>

#include "common/attention_checks.h"
#include "common/ffi_helpers.h"
#include "common/registry.h"
#include "flash_attention/cpu_kernels.h"
#include "flash_attention/ffi_bindings.h"

namespace jax_sparsek::flash {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

// The kernels' sizes from the checked shape (the CPU kernels take every dtype that
// ReadAttentionShape accepts).
Dims KernelDims(const AttentionShape& s) { return Dims{s.B, s.T, s.S, s.N, s.K, s.D, s.Dv}; }

ffi::Error MakeDenseMask(const AttentionShape& d, bool causal, int64_t left, int64_t right,
                         DenseMask* out) {
  if (left < -1 || right < -1)
    return ffi::Error::InvalidArgument("window_left and window_right must be >= 0, or -1 for "
                                       "unbounded; got " + Str(left) + ", " + Str(right));
  *out = DenseMask{KeyRange{d.T, d.S, causal, left, right}};
  return ffi::Error::Success();
}

ffi::Error MakeBlockMask(const AttentionShape& d, const ffi::AnyBuffer& mask, bool causal,
                         int64_t block_q, int64_t block_k, BlockMask* out) {
  if (block_q <= 0 || block_k <= 0)
    return ffi::Error::InvalidArgument("block_q and block_k must be positive, got " +
                                       Str(block_q) + ", " + Str(block_k));
  int64_t md[4];
  JSK_RETURN_IF_ERROR(GetDims("block_mask", mask, md));
  JSK_RETURN_IF_ERROR(ExpectDtype("block_mask", mask, ffi::DataType::PRED));
  const int64_t q_blocks = CeilDiv(d.T, block_q), k_blocks = CeilDiv(d.S, block_k);
  const bool batch_ok = md[0] == d.B || md[0] == 1;
  const bool heads_ok = md[1] == d.N || md[1] == d.K || md[1] == 1;
  if (!batch_ok || !heads_ok || md[2] != q_blocks || md[3] != k_blocks)
    return ffi::Error::InvalidArgument(
        "block_mask must have shape [B=" + Str(d.B) + " or 1, N=" + Str(d.N) + " or K=" +
        Str(d.K) + " or 1, ceil(T/block_q)=" + Str(q_blocks) + ", ceil(S/block_k)=" +
        Str(k_blocks) + "], got " + ShapeString(mask.dimensions()));
  *out = BlockMask{KeyRange{d.T, d.S, causal, -1, -1},
                   reinterpret_cast<const bool*>(mask.untyped_data()),
                   md[0], md[1], q_blocks, k_blocks, block_q, block_k, d.N, d.K};
  return ffi::Error::Success();
}

template <typename Mask>
ffi::Error Forward(const AttentionShape& d, float scale, const Mask& mask, const ffi::AnyBuffer& q,
                   const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, ffi::AnyBuffer o,
                   ffi::AnyBuffer lse) {
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(d, q.element_type(), o, lse));
  DispatchFloat(q.element_type(), [&](auto tag) {
    using T = decltype(tag);
    ForwardArgs<T> args{KernelDims(d), scale,
                        reinterpret_cast<const T*>(q.untyped_data()),
                        reinterpret_cast<const T*>(k.untyped_data()),
                        reinterpret_cast<const T*>(v.untyped_data()),
                        reinterpret_cast<T*>(o.untyped_data()),
                        reinterpret_cast<float*>(lse.untyped_data())};
    AttentionForward(args, mask);
  });
  return ffi::Error::Success();
}

template <typename Mask>
ffi::Error Backward(const AttentionShape& d, float scale, const Mask& mask, const ffi::AnyBuffer& q,
                    const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, const ffi::AnyBuffer& o,
                    const ffi::AnyBuffer& lse, const ffi::AnyBuffer& dout, ffi::AnyBuffer dq,
                    ffi::AnyBuffer dk, ffi::AnyBuffer dv, ffi::AnyBuffer dq_accum) {
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(d, q.element_type(), o, lse));
  JSK_RETURN_IF_ERROR(CheckAttentionGradients(d, q.element_type(), dout, dq, dk, dv));
  JSK_RETURN_IF_ERROR(ExpectShape("dq_accum", dq_accum, {d.B, d.T, d.N, d.D}));
  JSK_RETURN_IF_ERROR(ExpectDtype("dq_accum", dq_accum, ffi::DataType::F32));
  DispatchFloat(q.element_type(), [&](auto tag) {
    using T = decltype(tag);
    BackwardArgs<T> args{KernelDims(d), scale,
                         reinterpret_cast<const T*>(q.untyped_data()),
                         reinterpret_cast<const T*>(k.untyped_data()),
                         reinterpret_cast<const T*>(v.untyped_data()),
                         reinterpret_cast<const T*>(o.untyped_data()),
                         reinterpret_cast<const T*>(dout.untyped_data()),
                         reinterpret_cast<const float*>(lse.untyped_data()),
                         reinterpret_cast<T*>(dq.untyped_data()),
                         reinterpret_cast<T*>(dk.untyped_data()),
                         reinterpret_cast<T*>(dv.untyped_data()),
                         reinterpret_cast<float*>(dq_accum.untyped_data())};
    AttentionBackward(args, mask);
  });
  return ffi::Error::Success();
}

ffi::Error FlashFwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, float scale,
                        bool causal, int64_t window_left, int64_t window_right) {
  AttentionShape d;
  DenseMask mask;
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, &d));
  JSK_RETURN_IF_ERROR(MakeDenseMask(d, causal, window_left, window_right, &mask));
  return Forward(d, scale, mask, q, k, v, *o, *lse);
}

ffi::Error FlashBwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o,
                        ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        ffi::Result<ffi::AnyBuffer> dq_accum, float scale, bool causal,
                        int64_t window_left, int64_t window_right, bool /*deterministic: always*/) {
  AttentionShape d;
  DenseMask mask;
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, &d));
  JSK_RETURN_IF_ERROR(MakeDenseMask(d, causal, window_left, window_right, &mask));
  return Backward(d, scale, mask, q, k, v, o, lse, dout, *dq, *dk, *dv, *dq_accum);
}

ffi::Error BlockSparseFwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                              ffi::AnyBuffer block_mask, ffi::Result<ffi::AnyBuffer> o,
                              ffi::Result<ffi::AnyBuffer> lse, float scale, bool causal,
                              int64_t block_q, int64_t block_k) {
  AttentionShape d;
  BlockMask mask;
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, &d));
  JSK_RETURN_IF_ERROR(MakeBlockMask(d, block_mask, causal, block_q, block_k, &mask));
  return Forward(d, scale, mask, q, k, v, *o, *lse);
}

ffi::Error BlockSparseBwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                              ffi::AnyBuffer block_mask, ffi::AnyBuffer o, ffi::AnyBuffer lse,
                              ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                              ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                              ffi::Result<ffi::AnyBuffer> dq_accum, float scale, bool causal,
                              int64_t block_q, int64_t block_k, bool /*deterministic: always*/) {
  AttentionShape d;
  BlockMask mask;
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, &d));
  JSK_RETURN_IF_ERROR(MakeBlockMask(d, block_mask, causal, block_q, block_k, &mask));
  return Backward(d, scale, mask, q, k, v, o, lse, dout, *dq, *dk, *dv, *dq_accum);
}

}  // namespace
}  // namespace jax_sparsek::flash

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JskFlashFwdCpu, jax_sparsek::flash::FlashFwdImpl,
                              jax_sparsek::flash::ForwardBinding<false>(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JskFlashBwdCpu, jax_sparsek::flash::FlashBwdImpl,
                              jax_sparsek::flash::BackwardBinding<false>(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JskBlockSparseFwdCpu, jax_sparsek::flash::BlockSparseFwdImpl,
                              jax_sparsek::flash::ForwardBinding<true>(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JskBlockSparseBwdCpu, jax_sparsek::flash::BlockSparseBwdImpl,
                              jax_sparsek::flash::BackwardBinding<true>(ffi::Ffi::Bind()));

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_flash_fwd", "cpu", JskFlashFwdCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_flash_bwd", "cpu", JskFlashBwdCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_block_sparse_fwd", "cpu", JskBlockSparseFwdCpu);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_block_sparse_bwd", "cpu", JskBlockSparseBwdCpu);
