"""flash_attention on the FFI kernels (targets jax_sparsek_flash_fwd / _bwd)."""

from __future__ import annotations

import numpy as np

from jax_sparsek._attention_vjp import AttentionKernel, attention

FWD_TARGET = "jax_sparsek_flash_fwd"
BWD_TARGET = "jax_sparsek_flash_bwd"


def runs_decode_kernel(T: int, D: int, Dv: int) -> bool:
    """Whether the forward runs the decode kernel (one query row; it takes Dv == D only)."""
    return T == 1 and Dv == D


def flash_attention(q, k, v, *, causal: bool, window: tuple[int, int], scale: float,
                    deterministic: bool):
    """Arguments already validated; `window` = (left, right) with -1 for an unbounded side."""
    decode_key_begin = None
    if runs_decode_kernel(q.shape[1], q.shape[3], v.shape[3]):
        # Decoding: the query sits at S - 1, after every key (causal or not), so only the
        # window's left edge masks keys.
        decode_key_begin = max(0, k.shape[1] - 1 - window[0]) if window[0] >= 0 else 0
    kernel = AttentionKernel(
        FWD_TARGET, BWD_TARGET,
        attrs=(("scale", np.float32(scale)), ("causal", bool(causal)),
               ("window_left", np.int64(window[0])), ("window_right", np.int64(window[1]))),
        bwd_attrs=(("deterministic", deterministic),),
        name="flash_attention", decode_key_begin=decode_key_begin)
    return attention(kernel, q, k, v, None)
