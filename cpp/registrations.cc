// The package's one extension module: exposes every FFI handler registered by the op
// folders (see common/registry.h) and the jaxlib version the handlers were built against.
#include <nanobind/nanobind.h>

#include "common/registry.h"
#ifdef JAX_SPARSEK_WITH_CUDA
#include "sparsek/cuda/sparsek_kernels.h"
#endif

namespace nb = nanobind;

namespace jax_sparsek {
std::vector<FfiTarget>& FfiTargets() {
  static std::vector<FfiTarget> targets;
  return targets;
}
}  // namespace jax_sparsek

NB_MODULE(_jax_sparsek_ext, m) {
  m.def("registrations", []() {
    nb::list out;
    for (const auto& t : jax_sparsek::FfiTargets()) {
      out.append(nb::make_tuple(t.name, t.platform,
                                nb::capsule(reinterpret_cast<void*>(t.handler))));
    }
    return out;
  }, "[(target_name, platform, handler_capsule)] for every FFI handler in this build.");
  m.attr("built_against_jaxlib") = JAXLIB_BUILD_VERSION;
#ifdef JAX_SPARSEK_WITH_CUDA
  m.attr("with_cuda") = true;
  // Workspace sizes of the CUDA SparseK targets (the Python wrapper allocates them as results).
  using jax_sparsek::cuda::sparsek::SparsekDims;
  m.def("sparsek_select_workspace_bytes",
        [](int B, int T, int S, int K, int k_select, int window, bool causal) {
          return jax_sparsek::cuda::sparsek::SelectWorkspaceBytes(
              SparsekDims{B, T, S, K, K, 0, k_select, window, causal});
        });
  m.attr("sparsek_tile_queries") = jax_sparsek::cuda::sparsek::kTileQueries;
  m.def("sparsek_backward_workspace_bytes",
        [](int B, int T, int S, int N, int K, int D, int k_select, int window, bool causal) {
          return jax_sparsek::cuda::sparsek::BackwardWorkspaceBytes(
              SparsekDims{B, T, S, N, K, D, k_select, window, causal});
        });
#else
  m.attr("with_cuda") = false;
#endif
}
