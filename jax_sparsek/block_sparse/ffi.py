"""block_sparse_attention on the FFI kernels (targets jax_sparsek_block_sparse_fwd / _bwd)."""

from __future__ import annotations

import numpy as np

from jax_sparsek._attention_vjp import AttentionKernel, attention

FWD_TARGET = "jax_sparsek_block_sparse_fwd"
BWD_TARGET = "jax_sparsek_block_sparse_bwd"


def block_sparse_attention(q, k, v, block_mask, *, block_size: tuple[int, int], causal: bool,
                           scale: float, deterministic: bool):
    """Arguments already validated."""
    kernel = AttentionKernel(
        FWD_TARGET, BWD_TARGET,
        attrs=(("scale", np.float32(scale)), ("causal", bool(causal)),
               ("block_q", np.int64(block_size[0])), ("block_k", np.int64(block_size[1]))),
        bwd_attrs=(("deterministic", deterministic),),
        name="block_sparse_attention")
    return attention(kernel, q, k, v, block_mask)
