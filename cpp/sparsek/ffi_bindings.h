// The FFI contract of the SparseK targets, written once for the CPU and CUDA handlers:
// operands, then results, then attributes (the Python wrapper's order, jax_sparsek/sparsek/ffi.py).
// The CUDA pipeline adds the key lists (made by its select call, read by its forward and
// backward: per tile of queries the keys the tile selects, and each key's score rank) and
// workspaces; its targets carry a
// "_cuda" suffix because their signatures differ. Contracts: sparsek_ffi.cc (CPU) and
// cuda/ffi_handlers.cu. `bind` is ffi::Ffi::Bind() plus any platform context the handler takes
// first (the CUDA stream).
#pragma once

#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_sparsek::sparsek {

namespace ffi = xla::ffi;

// kCount (>= 1) more operands / results. Each step returns a binding of a new type: a
// binding of the same type cannot be returned (no copy or same-type move).
template <int kCount, typename Binding>
auto Args(Binding&& bind) {
  static_assert(kCount >= 1);
  if constexpr (kCount == 1) {
    return std::move(bind).template Arg<ffi::AnyBuffer>();
  } else {
    return Args<kCount - 1>(std::move(bind).template Arg<ffi::AnyBuffer>());
  }
}

template <int kCount, typename Binding>
auto Rets(Binding&& bind) {
  static_assert(kCount >= 1);
  if constexpr (kCount == 1) {
    return std::move(bind).template Ret<ffi::AnyBuffer>();
  } else {
    return Rets<kCount - 1>(std::move(bind).template Ret<ffi::AnyBuffer>());
  }
}

template <typename Binding>
auto AttentionAttrs(Binding&& bind) {
  return std::move(bind).template Attr<float>("scale")
      .template Attr<int64_t>("k_select")
      .template Attr<int64_t>("window")
      .template Attr<bool>("causal");
}

// Select: scores -> tau, kth [, tile_keys, tile_count, key_rank, workspace].
template <bool kTileLists, typename Binding>
auto SelectBinding(Binding&& bind) {
  return Rets<kTileLists ? 6 : 2>(Args<1>(std::move(bind)))
      .template Attr<int64_t>("k_select")
      .template Attr<int64_t>("window")
      .template Attr<bool>("causal")
      .template Attr<int64_t>("num_queries");
}

// Forward: q, k, v, scores, tau, kth [, tile_keys, tile_count, key_rank] -> o, lse.
template <bool kTileLists, typename Binding>
auto ForwardBinding(Binding&& bind) {
  return AttentionAttrs(Rets<2>(Args<kTileLists ? 9 : 6>(std::move(bind))));
}

// Backward: q, k, v, scores, tau, kth [, tile_keys, tile_count, key_rank], o, lse, do
//   -> dq, dk, dv, dscores [, workspace].
template <bool kTileLists, typename Binding>
auto BackwardBinding(Binding&& bind) {
  return AttentionAttrs(Rets<kTileLists ? 5 : 4>(Args<kTileLists ? 12 : 9>(std::move(bind))));
}

}  // namespace jax_sparsek::sparsek
