// XLA FFI handlers (platform "CUDA") for flash and block-sparse attention: validate shapes,
// dtypes and attributes (InvalidArgument, never abort), build the kernel arguments, launch on
// XLA's stream. Targets and operand order match the CPU handlers:
//   jax_sparsek_flash_fwd(q, k, v) -> (o, lse)                  attrs scale, causal, window_left, window_right
//   jax_sparsek_flash_bwd(q, k, v, o, lse, do) -> (dq, dk, dv, dq_accum)
//   jax_sparsek_block_sparse_fwd(q, k, v, block_mask) -> (o, lse)   attrs scale, causal, block_q, block_k
//   jax_sparsek_block_sparse_bwd(q, k, v, block_mask, o, lse, do) -> (dq, dk, dv, dq_accum)
// The backward targets take the forward's attributes and `deterministic` (bwd.cu).
// dq_accum is an fp32 [B, T, N, D] workspace (allocated by XLA, so the handlers stay CUDA-graph
// compatible); the kernels zero it themselves.
#include <cstdlib>
#include <cstring>
#include <string>

#include "attention_kernels.h"
#include "common/attention_checks.h"
#include "common/ffi_helpers.h"
#include "common/registry.h"
#include "flash_attention/ffi_bindings.h"

namespace jax_sparsek::cuda {
namespace {

namespace ffi = xla::ffi;

// The shared attention checks (common/attention_checks.h) plus what the CUDA kernels need on
// top: 16-bit inputs, one head dim D = Dv of 64 or 128, every axis below 2^30 (int indexing).
ffi::Error CheckInputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                       AttentionShape* shape, AttentionDims* dims, bool* bf16) {
  const ffi::DataType dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument(
        std::string("the CUDA attention kernels take bfloat16 or float16 q/k/v, got ") +
        DtypeName(dt) + " (float32 inputs run on the XLA path)");
  }
  JSK_RETURN_IF_ERROR(ReadAttentionShape(q, k, v, shape));
  const AttentionShape& s = *shape;
  if (s.Dv != s.D) {
    return ffi::Error::InvalidArgument("the CUDA attention kernels need v's head dim (" +
                                       std::to_string(s.Dv) + ") equal to q's (" +
                                       std::to_string(s.D) + ")");
  }
  if (s.D != 64 && s.D != 128) {
    return ffi::Error::InvalidArgument("head dim D=" + std::to_string(s.D) +
                                       " is not supported by the CUDA attention kernels (64 or 128)");
  }
  const int64_t kMax = int64_t(1) << 30;
  if (s.B >= kMax || s.T >= kMax || s.S >= kMax || s.N >= kMax) {
    return ffi::Error::InvalidArgument("attention shapes exceed the CUDA kernels' 2^30 limit per axis");
  }
  *dims = {int(s.B), int(s.T), int(s.S), int(s.N), int(s.K), int(s.D)};
  *bf16 = dt == ffi::DataType::BF16;
  return ffi::Error::Success();
}

ffi::Error WindowMask(const AttentionDims& d, bool causal, int64_t left, int64_t right, MaskSpec* m) {
  if (left < -1 || right < -1) {
    return ffi::Error::InvalidArgument("window bounds must be >= 0, or -1 for unbounded; got (" +
                                       std::to_string(left) + ", " + std::to_string(right) + ")");
  }
  const int64_t cap = int64_t(d.S) + d.T;  // any larger bound changes nothing
  m->T = d.T;
  m->S = d.S;
  m->causal = causal;
  m->left = int(left < 0 ? -1 : std::min(left, cap));
  m->right = int(right < 0 ? -1 : std::min(right, cap));
  return ffi::Error::Success();
}

ffi::Error BlockMask(const AttentionDims& d, const ffi::AnyBuffer& mask, int64_t bq, int64_t bk,
                     MaskSpec* m) {
  if (bq < 1 || bk < 1 || bq >= (int64_t(1) << 30) || bk >= (int64_t(1) << 30)) {
    return ffi::Error::InvalidArgument("block sizes must be positive, got (" + std::to_string(bq) +
                                       ", " + std::to_string(bk) + ")");
  }
  JSK_RETURN_IF_ERROR(ExpectDtype("block_mask", mask, ffi::DataType::PRED));
  int64_t md[4];
  JSK_RETURN_IF_ERROR(GetDims("block_mask", mask, md));
  const int64_t rows = (d.T + bq - 1) / bq, cols = (d.S + bk - 1) / bk;
  const bool batch_ok = md[0] == d.B || md[0] == 1;
  const bool heads_ok = md[1] == d.N || md[1] == d.K || md[1] == 1;
  if (!batch_ok || !heads_ok || md[2] != rows || md[3] != cols) {
    return ffi::Error::InvalidArgument(
        "block_mask must have shape [B or 1, N or K or 1, ceil(T/bq), ceil(S/bk)] = [" +
        std::to_string(d.B) + " or 1, " + std::to_string(d.N) + " or " + std::to_string(d.K) +
        " or 1, " + std::to_string(rows) + ", " + std::to_string(cols) + "], got " +
        ShapeString(mask.dimensions()));
  }
  m->block_mask = static_cast<const uint8_t*>(mask.untyped_data());
  m->bq = int(bq);
  m->bk = int(bk);
  m->rows = int(rows);
  m->cols = int(cols);
  m->batch_stride = md[0] == 1 ? 0 : md[1] * rows * cols;
  if (md[1] == d.N) {
    m->head_stride = rows * cols;
    m->head_div = 1;
  } else if (md[1] == d.K) {
    m->head_stride = rows * cols;
    m->head_div = d.N / d.K;
  } else {
    m->head_stride = 0;
    m->head_div = 1;
  }
  return ffi::Error::Success();
}

// Developer switch for side-by-side timing: JAX_SPARSEK_CUDA_FWD_KERNEL=wgmma (default),
// wgmma_nopingpong or mma.
FwdKernel SelectedFwdKernel() {
  const char* env = std::getenv("JAX_SPARSEK_CUDA_FWD_KERNEL");
  if (env && std::strcmp(env, "mma") == 0) return FwdKernel::kMmaSync;
  if (env && std::strcmp(env, "wgmma_nopingpong") == 0) return FwdKernel::kWgmmaNoPingPong;
  return FwdKernel::kWgmma;
}

ffi::Error LaunchResult(cudaError_t err, const std::string& detail, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err) +
                              (detail.empty() ? "" : " (" + detail + ")"));
}

ffi::Error Forward(cudaStream_t stream, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                   const ffi::AnyBuffer& v, const MaskSpec& mask_in, const AttentionDims& dims,
                   bool bf16, ffi::AnyBuffer o, ffi::AnyBuffer lse, float scale) {
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  FwdArgs a;
  a.dims = dims;
  a.mask = mask_in;
  a.bf16 = bf16;
  a.scale = scale;
  a.q = q.untyped_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  a.o = o.untyped_data();
  a.lse = static_cast<float*>(lse.untyped_data());
  std::string detail;
  return LaunchResult(LaunchFlashForward(a, SelectedFwdKernel(), stream, &detail), detail,
                      "attention forward launch failed");
}

ffi::Error Backward(cudaStream_t stream, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                    const ffi::AnyBuffer& v, const ffi::AnyBuffer& o, const ffi::AnyBuffer& lse,
                    const ffi::AnyBuffer& dout, const MaskSpec& mask, const AttentionShape& shape,
                    const AttentionDims& d, bool bf16, float scale, bool deterministic,
                    ffi::AnyBuffer dq, ffi::AnyBuffer dk, ffi::AnyBuffer dv,
                    ffi::AnyBuffer dq_accum) {
  const ffi::DataType dt = q.element_type();
  JSK_RETURN_IF_ERROR(CheckScale(scale));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(shape, dt, o, lse));
  JSK_RETURN_IF_ERROR(CheckAttentionGradients(shape, dt, dout, dq, dk, dv));
  JSK_RETURN_IF_ERROR(ExpectShape("dq_accum", dq_accum, {shape.B, shape.T, shape.N, shape.D}));
  JSK_RETURN_IF_ERROR(ExpectDtype("dq_accum", dq_accum, ffi::DataType::F32));
  BwdArgs a;
  a.dims = d;
  a.mask = mask;
  a.bf16 = bf16;
  a.scale = scale;
  a.deterministic = deterministic;
  a.q = q.untyped_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  a.o = o.untyped_data();
  a.do_ = dout.untyped_data();
  a.lse = static_cast<const float*>(lse.untyped_data());
  a.dq = dq.untyped_data();
  a.dk = dk.untyped_data();
  a.dv = dv.untyped_data();
  a.dq_accum = static_cast<float*>(dq_accum.untyped_data());
  std::string detail;
  return LaunchResult(LaunchFlashBackward(a, stream, &detail), detail, "attention backward launch failed");
}

ffi::Error FlashFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, float scale,
                        bool causal, int64_t window_left, int64_t window_right) {
  AttentionShape shape;
  AttentionDims d;
  bool bf16;
  MaskSpec mask;
  JSK_RETURN_IF_ERROR(CheckInputs(q, k, v, &shape, &d, &bf16));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(shape, q.element_type(), *o, *lse));
  JSK_RETURN_IF_ERROR(WindowMask(d, causal, window_left, window_right, &mask));
  return Forward(stream, q, k, v, mask, d, bf16, *o, *lse, scale);
}

ffi::Error FlashBwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                        ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dq_accum,
                        float scale, bool causal, int64_t window_left, int64_t window_right,
                        bool deterministic) {
  AttentionShape shape;
  AttentionDims d;
  bool bf16;
  MaskSpec mask;
  JSK_RETURN_IF_ERROR(CheckInputs(q, k, v, &shape, &d, &bf16));
  JSK_RETURN_IF_ERROR(WindowMask(d, causal, window_left, window_right, &mask));
  return Backward(stream, q, k, v, o, lse, dout, mask, shape, d, bf16, scale, deterministic, *dq,
                  *dk, *dv, *dq_accum);
}

ffi::Error BlockSparseFwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::AnyBuffer block_mask,
                              ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                              float scale, bool causal, int64_t block_q, int64_t block_k) {
  AttentionShape shape;
  AttentionDims d;
  bool bf16;
  MaskSpec mask;
  JSK_RETURN_IF_ERROR(CheckInputs(q, k, v, &shape, &d, &bf16));
  JSK_RETURN_IF_ERROR(CheckAttentionOutputs(shape, q.element_type(), *o, *lse));
  JSK_RETURN_IF_ERROR(WindowMask(d, causal, -1, -1, &mask));
  JSK_RETURN_IF_ERROR(BlockMask(d, block_mask, block_q, block_k, &mask));
  return Forward(stream, q, k, v, mask, d, bf16, *o, *lse, scale);
}

ffi::Error BlockSparseBwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::AnyBuffer block_mask, ffi::AnyBuffer o,
                              ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                              ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                              ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dq_accum,
                              float scale, bool causal, int64_t block_q, int64_t block_k,
                              bool deterministic) {
  AttentionShape shape;
  AttentionDims d;
  bool bf16;
  MaskSpec mask;
  JSK_RETURN_IF_ERROR(CheckInputs(q, k, v, &shape, &d, &bf16));
  JSK_RETURN_IF_ERROR(WindowMask(d, causal, -1, -1, &mask));
  JSK_RETURN_IF_ERROR(BlockMask(d, block_mask, block_q, block_k, &mask));
  return Backward(stream, q, k, v, o, lse, dout, mask, shape, d, bf16, scale, deterministic, *dq,
                  *dk, *dv, *dq_accum);
}

// The stream comes first; operands, results and attributes as on the CPU (ffi_bindings.h).
auto BindWithStream() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashFwdCuda, FlashFwdImpl,
                              flash::ForwardBinding<false>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashBwdCuda, FlashBwdImpl,
                              flash::BackwardBinding<false>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(BlockSparseFwdCuda, BlockSparseFwdImpl,
                              flash::ForwardBinding<true>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(BlockSparseBwdCuda, BlockSparseBwdImpl,
                              flash::BackwardBinding<true>(BindWithStream()),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_SPARSEK_REGISTER_FFI("jax_sparsek_flash_fwd", "CUDA", FlashFwdCuda);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_flash_bwd", "CUDA", FlashBwdCuda);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_block_sparse_fwd", "CUDA", BlockSparseFwdCuda);
JAX_SPARSEK_REGISTER_FFI("jax_sparsek_block_sparse_bwd", "CUDA", BlockSparseBwdCuda);

}  // namespace jax_sparsek::cuda
