"""Pure-JAX block_sparse_attention (SPEC.md section 2): the block mask expanded to a [T, S]
mask per (batch, head), then the masked softmax of the flash_attention reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek._validation import AttentionDims, check_attention_inputs, check_bool, check_scale
from jax_sparsek.flash_attention.reference import masked_attention, visible_keys


def check_block_size(block_size) -> tuple[int, int]:
    """`block_size` = (bq, bk), two positive ints."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise TypeError(f"block_size must be a pair (bq, bk) of positive ints, got {block_size!r}")
    for name, b in zip(("bq", "bk"), block_size):
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"block_size {name} must be a positive int, got {b!r}")
        if b <= 0:
            raise ValueError(f"block_size {name} must be a positive int, got {b}")
    return int(block_size[0]), int(block_size[1])


def check_block_mask(block_mask, dims: AttentionDims, block_size: tuple[int, int]) -> None:
    """bool [B or 1, N or K or 1, ceil(T / bq), ceil(S / bk)]."""
    if not hasattr(block_mask, "shape") or not hasattr(block_mask, "dtype"):
        raise TypeError(f"block_mask must be a bool array, got {type(block_mask).__name__}")
    if jnp.dtype(block_mask.dtype) != jnp.dtype(bool):
        raise TypeError(f"block_mask must be a bool array, got dtype {jnp.dtype(block_mask.dtype)}")
    bq, bk = block_size
    q_blocks, k_blocks = math.ceil(dims.T / bq), math.ceil(dims.S / bk)
    shape = tuple(block_mask.shape)
    if (len(shape) != 4 or shape[0] not in (dims.B, 1) or shape[1] not in (dims.N, dims.K, 1)
            or shape[2:] != (q_blocks, k_blocks)):
        raise ValueError(
            f"block_mask must have shape [B={dims.B} or 1, N={dims.N} or K={dims.K} or 1, "
            f"ceil(T/bq)={q_blocks}, ceil(S/bk)={k_blocks}] for T={dims.T}, S={dims.S}, "
            f"block_size=({bq}, {bk}); got {shape}")


def expand_block_mask(block_mask, dims: AttentionDims, block_size: tuple[int, int]) -> jax.Array:
    """[Bm, N or 1, T, S] bool: block_mask[b, head(h), i // bq, j // bk] for every (i, j).

    Mask heads are per query head (N), per kv head (K, shared by the group) or shared (1)."""
    bq, bk = block_size
    mask = block_mask
    if mask.shape[1] != dims.N and mask.shape[1] == dims.K:
        mask = jnp.repeat(mask, dims.N // dims.K, axis=1)
    rows = jnp.arange(dims.T) // bq
    cols = jnp.arange(dims.S) // bk
    return mask[:, :, rows][:, :, :, cols]


def block_sparse_attention(q, k, v, block_mask, *, block_size, causal: bool = False,
                           scale=None) -> jax.Array:
    """Reference of jax_sparsek.block_sparse_attention (same arguments, no `implementation` and
    no `deterministic`: it always is)."""
    dims = check_attention_inputs(q, k, v)
    block_size = check_block_size(block_size)
    check_block_mask(block_mask, dims, block_size)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, dims.D)
    visible = expand_block_mask(block_mask, dims, block_size)
    visible &= visible_keys(dims.T, dims.S, causal=causal)[None, None]
    return masked_attention(q, k, v, visible, scale)
