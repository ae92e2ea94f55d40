// Self-registration of FFI handlers: each op's handler file registers its targets with
// JAX_SPARSEK_REGISTER_FFI at load time, and the one nanobind module (registrations.cc)
// hands the whole table to Python. Adding an op never touches a central list.
#pragma once

#include <vector>

#include "xla/ffi/api/c_api.h"

namespace jax_sparsek {

struct FfiTarget {
  const char* name;      // e.g. "jax_sparsek_flash_fwd"; one name, one handler per platform
  const char* platform;  // "cpu" or "CUDA", as jax.ffi.register_ffi_target spells them
  XLA_FFI_Handler* handler;
};

std::vector<FfiTarget>& FfiTargets();

struct FfiTargetRegistration {
  FfiTargetRegistration(const char* name, const char* platform, XLA_FFI_Handler* handler) {
    FfiTargets().push_back({name, platform, handler});
  }
};

}  // namespace jax_sparsek

#define JSK_CONCAT_INNER(a, b) a##b
#define JSK_CONCAT(a, b) JSK_CONCAT_INNER(a, b)
#define JAX_SPARSEK_REGISTER_FFI(name, platform, handler)                          \
  static ::jax_sparsek::FfiTargetRegistration JSK_CONCAT(jsk_ffi_registration_, \
                                                         __COUNTER__)(name, platform, handler)
