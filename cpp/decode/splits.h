// How the decode kernel splits a cache over CTAs, shared by its launcher and by the handlers'
// bound on the `partials` result: splits hold multiples of kSplitEntries entries, so a call
// has at most max(1, ceil(R / kSplitEntries)) of them.
#pragma once

#include <cstdint>

namespace jax_sparsek::decode {

constexpr int64_t kSplitEntries = 64;

}  // namespace jax_sparsek::decode
