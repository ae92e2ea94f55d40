// The FFI contract of the four attention targets, written once for the CPU and CUDA handlers:
// operands, then results, then attributes (in the Python wrapper's order, see
// jax_sparsek/_attention_vjp.py). `bind` is ffi::Ffi::Bind() plus any platform context the
// handler takes first (the CUDA stream); the handler's parameters follow that order.
// (ffi::Binding can be neither copied nor moved: it passes by rvalue reference, and each
// step returns the extended binding.)
#pragma once

#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_sparsek::flash {

namespace ffi = xla::ffi;

// Attributes of the dense kernels: softmax scale, causal flag, window bounds (-1 = unbounded).
template <typename Binding>
auto DenseMaskAttrs(Binding&& bind) {
  return std::move(bind).template Attr<float>("scale")
      .template Attr<bool>("causal")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right");
}

// Attributes of the block-sparse kernels: softmax scale, causal flag, block size.
template <typename Binding>
auto BlockMaskAttrs(Binding&& bind) {
  return std::move(bind).template Attr<float>("scale")
      .template Attr<bool>("causal")
      .template Attr<int64_t>("block_q")
      .template Attr<int64_t>("block_k");
}

template <typename Binding>
auto QkvArgs(Binding&& bind) {
  return std::move(bind).template Arg<ffi::AnyBuffer>()   // q
      .template Arg<ffi::AnyBuffer>()          // k
      .template Arg<ffi::AnyBuffer>();         // v
}

// Forward: q, k, v [, block_mask] -> o, lse.
template <bool kBlockMask, typename Binding>
auto ForwardBinding(Binding&& bind) {
  auto outputs = [](auto&& args) {
    return std::move(args).template Ret<ffi::AnyBuffer>()   // o
        .template Ret<ffi::AnyBuffer>();         // lse
  };
  if constexpr (kBlockMask) {
    return BlockMaskAttrs(outputs(QkvArgs(std::move(bind)).template Arg<ffi::AnyBuffer>()));  // block_mask
  } else {
    return DenseMaskAttrs(outputs(QkvArgs(std::move(bind))));
  }
}

// Backward: q, k, v [, block_mask], o, lse, do -> dq, dk, dv, dq_accum (float32 workspace);
// the mask attributes, then `deterministic` (dq bitwise reproducible: the CUDA kernel adds
// the key tiles' dq shares in a fixed order; the CPU kernels always are).
template <bool kBlockMask, typename Binding>
auto BackwardBinding(Binding&& bind) {
  auto gradients = [](auto&& args) {
    return std::move(args).template Arg<ffi::AnyBuffer>()   // o
        .template Arg<ffi::AnyBuffer>()          // lse
        .template Arg<ffi::AnyBuffer>()          // do
        .template Ret<ffi::AnyBuffer>()          // dq
        .template Ret<ffi::AnyBuffer>()          // dk
        .template Ret<ffi::AnyBuffer>()          // dv
        .template Ret<ffi::AnyBuffer>();         // dq_accum
  };
  auto with_mask_attrs = [&] {
    if constexpr (kBlockMask) {
      return BlockMaskAttrs(gradients(QkvArgs(std::move(bind)).template Arg<ffi::AnyBuffer>()));  // block_mask
    } else {
      return DenseMaskAttrs(gradients(QkvArgs(std::move(bind))));
    }
  };
  return with_mask_attrs().template Attr<bool>("deterministic");
}

}  // namespace jax_sparsek::flash
