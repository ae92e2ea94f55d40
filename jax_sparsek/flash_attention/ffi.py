"""flash_attention on the FFI kernels (targets jax_sparsek_flash_fwd / _bwd)."""

from __future__ import annotations

import numpy as np

from jax_sparsek._attention_vjp import AttentionKernel, attention

FWD_TARGET = "jax_sparsek_flash_fwd"
BWD_TARGET = "jax_sparsek_flash_bwd"


def flash_attention(q, k, v, *, causal: bool, window: tuple[int, int], scale: float):
    """Arguments already validated; `window` = (left, right) with -1 for an unbounded side."""
    kernel = AttentionKernel(
        FWD_TARGET, BWD_TARGET,
        attrs=(("scale", np.float32(scale)), ("causal", bool(causal)),
               ("window_left", np.int64(window[0])), ("window_right", np.int64(window[1]))),
        name="flash_attention")
    return attention(kernel, q, k, v, None)
