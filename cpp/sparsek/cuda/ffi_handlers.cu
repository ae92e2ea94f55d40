// XLA FFI handlers (platform "CUDA") of SparseK attention. The CUDA pipeline passes, besides the
// CPU contract's tau and kth (sparsek_ffi.cc), the key lists from the select call to the forward
// and backward (each query tile's listed keys, each key's score rank), and takes workspaces as
// extra results (allocated by XLA, so the handlers stay CUDA-graph compatible). Signatures in
// ../ffi_bindings.h ("lists" = tile_keys, tile_count, key_rank):
//   jax_sparsek_sparsek_select_cuda(scores) -> (tau, kth, lists, workspace)
//       attrs k_select, window, causal, num_queries
//   jax_sparsek_sparsek_fwd_cuda(q, k, v, scores, tau, kth, lists) -> (o, lse)
//   jax_sparsek_sparsek_bwd_cuda(q, k, v, scores, tau, kth, lists, o, lse, do)
//       -> (dq, dk, dv, dscores, workspace)           attrs scale, k_select, window, causal
// tile_keys s32 [B, K, ceil(T / 128), min(k_select, S) + 128], tile_count s32 [B, K, ceil(T / 128)],
// key_rank s32 [B, K, S];
// workspaces u8 of select_workspace_bytes / backward_workspace_bytes (the extension module
// exports both). q/k/v in bf16 or fp16 with D = Dv in {64, 128}. The kernels trust the lists
// and kth to come from the select call, but clamp every key index they read into [0, S).
#include <string>

#include "common/registry.h"
#include "sparsek/checks.h"
#include "sparsek/cuda/sparsek_kernels.h"
#include "sparsek/ffi_bindings.h"

namespace jax_sparsek::sparsek {
namespace {

using cuda::sparsek::SparsekDims;

ffi::Error CheckSizes(int64_t B, int64_t T, int64_t S, int64_t N, int64_t K) {
  const int64_t kMax = int64_t(1) << 30;
  if (B >= kMax || T >= kMax || S >= kMax || N >= kMax || K >= kMax)
    return ffi::Error::InvalidArgument("SparseK shapes exceed the CUDA kernels' 2^30 limit per axis");
  return ffi::Error::Success();
}

SparsekDims MakeDims(int64_t B, int64_t T, int64_t S, int64_t N, int64_t K, int64_t D,
                     int64_t k_select, int64_t window, bool causal) {
  return {int(B), int(T), int(S), int(N), int(K), int(D),
          int(std::min<int64_t>(k_select, int64_t(1) << 30)), int(ClippedWindow(window, S, T)), causal};
}

ffi::Error CheckKeyLists(const SparsekDims& d, const ffi::AnyBuffer& tile_keys,
                         const ffi::AnyBuffer& tile_count, const ffi::AnyBuffer& key_rank) {
  JSK_RETURN_IF_ERROR(CheckLike("tile_keys", tile_keys, ffi::DataType::S32,
                                {d.B, d.K, d.num_tiles(), d.list_capacity()}));
  JSK_RETURN_IF_ERROR(
      CheckLike("tile_count", tile_count, ffi::DataType::S32, {d.B, d.K, d.num_tiles()}));
  return CheckLike("key_rank", key_rank, ffi::DataType::S32, {d.B, d.K, d.S});
}

ffi::Error CheckWorkspace(const char* what, const ffi::AnyBuffer& ws, size_t need) {
  if (ws.element_type() != ffi::DataType::U8 || ws.size_bytes() < need)
    return ffi::Error::InvalidArgument(std::string(what) + " must be a uint8 buffer of at least " +
                                       std::to_string(need) + " bytes");
  return ffi::Error::Success();
}

// q, k, v: the CUDA kernels' dtypes and head dims; fills the dims.
ffi::Error CheckAttention(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                          const ffi::AnyBuffer& scores, const ffi::AnyBuffer& tau,
                          const ffi::AnyBuffer& kth, const ffi::AnyBuffer& tile_keys,
                          const ffi::AnyBuffer& tile_count, const ffi::AnyBuffer& key_rank,
                          float scale, int64_t k_select,
                          int64_t window, bool causal, AttentionShape* s, SparsekDims* d,
                          bool* bf16) {
  JSK_RETURN_IF_ERROR(CheckAttentionArgs(q, k, v, scores, tau, kth, scale, k_select, window, s));
  const ffi::DataType dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)
    return ffi::Error::InvalidArgument(std::string("the CUDA SparseK kernels take bfloat16 or "
                                                   "float16 q/k/v, got ") + DtypeName(dt));
  if (s->Dv != s->D || (s->D != 64 && s->D != 128))
    return ffi::Error::InvalidArgument("the CUDA SparseK kernels need D = Dv in {64, 128}, got D=" +
                                       std::to_string(s->D) + ", Dv=" + std::to_string(s->Dv));
  JSK_RETURN_IF_ERROR(CheckSizes(s->B, s->T, s->S, s->N, s->K));
  *d = MakeDims(s->B, s->T, s->S, s->N, s->K, s->D, k_select, window, causal);
  *bf16 = dt == ffi::DataType::BF16;
  return CheckKeyLists(*d, tile_keys, tile_count, key_rank);
}

ffi::Error LaunchResult(cudaError_t err, const std::string& detail, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err) +
                              (detail.empty() ? "" : " (" + detail + ")"));
}

template <typename T>
T* Data(ffi::AnyBuffer& b) { return static_cast<T*>(b.untyped_data()); }
template <typename T>
const T* Data(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }

ffi::Error SelectImpl(cudaStream_t stream, ffi::AnyBuffer scores, ffi::Result<ffi::AnyBuffer> tau,
                      ffi::Result<ffi::AnyBuffer> kth, ffi::Result<ffi::AnyBuffer> tile_keys,
                      ffi::Result<ffi::AnyBuffer> tile_count, ffi::Result<ffi::AnyBuffer> key_rank,
                      ffi::Result<ffi::AnyBuffer> workspace,
                      int64_t k_select, int64_t window, bool causal, int64_t num_queries) {
  int64_t B = 0, S = 0, K = 0;
  JSK_RETURN_IF_ERROR(ReadScoresShape(scores, &B, &S, &K));
  JSK_RETURN_IF_ERROR(CheckSelectionAttrs(k_select, window));
  if (num_queries < 1)
    return ffi::Error::InvalidArgument("num_queries must be >= 1, got " + std::to_string(num_queries));
  JSK_RETURN_IF_ERROR(CheckSizes(B, num_queries, S, K, K));
  const SparsekDims d = MakeDims(B, num_queries, S, K, K, 0, k_select, window, causal);
  JSK_RETURN_IF_ERROR(CheckLike("tau", *tau, ffi::DataType::F32, {B, K, num_queries}));
  JSK_RETURN_IF_ERROR(CheckLike("kth", *kth, ffi::DataType::S32, {B, K, num_queries}));
  JSK_RETURN_IF_ERROR(CheckKeyLists(d, *tile_keys, *tile_count, *key_rank));
  const size_t need = cuda::sparsek::SelectWorkspaceBytes(d);
  JSK_RETURN_IF_ERROR(CheckWorkspace("workspace", *workspace, need));
  cuda::sparsek::SelectArgs a{d, Data<float>(scores), Data<float>(*tau), Data<int32_t>(*kth),
                              Data<int32_t>(*tile_keys), Data<int32_t>(*tile_count),
                              Data<int32_t>(*key_rank), workspace->untyped_data(),
                              workspace->size_bytes()};
  std::string detail;
  return LaunchResult(cuda::sparsek::LaunchSparsekSelect(a, stream, &detail), detail,
                      "SparseK selection launch failed");
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::AnyBuffer scores, ffi::AnyBuffer tau, ffi::AnyBuffer kth,
                       ffi::AnyBuffer tile_keys, ffi::AnyBuffer tile_count,
                       ffi::AnyBuffer key_rank, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, float scale,
                       int64_t k_select, int64_t window, bool causal) {
  AttentionShape s;
  SparsekDims d;
  bool bf16;
  JSK_RETURN_IF_ERROR(CheckAttention(q, k, v, scores, tau, kth, tile_keys, tile_count, key_rank,
                                     scale, k_select, window, causal, &s, &d, &bf16));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(s, q.element_type(), *o, *lse));
  cuda::sparsek::ForwardArgs a{d, bf16, scale, q.untyped_data(), k.untyped_data(),
                               v.untyped_data(), Data<float>(scores), Data<float>(tau),
                               Data<int32_t>(kth), Data<int32_t>(tile_keys),
                               Data<int32_t>(tile_count), Data<int32_t>(key_rank),
                               o->untyped_data(), Data<float>(*lse)};
  std::string detail;
  return LaunchResult(cuda::sparsek::LaunchSparsekForward(a, stream, &detail), detail,
                      "SparseK forward launch failed");
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer scores, ffi::AnyBuffer tau, ffi::AnyBuffer kth,
                        ffi::AnyBuffer tile_keys, ffi::AnyBuffer tile_count,
                        ffi::AnyBuffer key_rank, ffi::AnyBuffer o,
                        ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        ffi::Result<ffi::AnyBuffer> dscores, ffi::Result<ffi::AnyBuffer> workspace,
                        float scale, int64_t k_select, int64_t window, bool causal) {
  AttentionShape s;
  SparsekDims d;
  bool bf16;
  JSK_RETURN_IF_ERROR(CheckAttention(q, k, v, scores, tau, kth, tile_keys, tile_count, key_rank,
                                     scale, k_select, window, causal, &s, &d, &bf16));
  const ffi::DataType dtype = q.element_type();
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(s, dtype, o, lse));
  JSK_RETURN_IF_ERROR(CheckAttentionGradients(s, dtype, dout, *dq, *dk, *dv));
  JSK_RETURN_IF_ERROR(CheckLike("dscores", *dscores, ffi::DataType::F32, {s.B, s.S, s.K}));
  JSK_RETURN_IF_ERROR(
      CheckWorkspace("workspace", *workspace, cuda::sparsek::BackwardWorkspaceBytes(d)));
  cuda::sparsek::BackwardArgs a{d, bf16, scale, q.untyped_data(), k.untyped_data(),
                                v.untyped_data(), o.untyped_data(), dout.untyped_data(),
                                Data<float>(scores), Data<float>(tau), Data<float>(lse),
                                Data<int32_t>(kth), Data<int32_t>(tile_keys),
                                Data<int32_t>(tile_count), Data<int32_t>(key_rank),
                                dq->untyped_data(), dk->untyped_data(),
                                dv->untyped_data(), Data<float>(*dscores),
                                workspace->untyped_data(), workspace->size_bytes()};
  std::string detail;
  return LaunchResult(cuda::sparsek::LaunchSparsekBackward(a, stream, &detail), detail,
                      "SparseK backward launch failed");
}

auto BindWithStream() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekSelectCuda, SelectImpl, SelectBinding<true>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekFwdCuda, ForwardImpl, ForwardBinding<true>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsekBwdCuda, BackwardImpl, BackwardBinding<true>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_select_cuda", "CUDA", SparsekSelectCuda);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_fwd_cuda", "CUDA", SparsekFwdCuda);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_sparsek_bwd_cuda", "CUDA", SparsekBwdCuda);

}  // namespace jax_sparsek::sparsek
