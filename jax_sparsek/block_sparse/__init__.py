"""Block-sparse attention: a boolean mask over (query block, key block) pairs; blocks that
are off cost nothing (SPEC.md section 2)."""

from __future__ import annotations

import jax

from jax_sparsek import _ffi
from jax_sparsek._validation import check_attention_inputs, check_bool, check_scale
from jax_sparsek.block_sparse import ffi, reference
from jax_sparsek.block_sparse.reference import check_block_mask, check_block_size

__all__ = ["block_sparse_attention"]


def block_sparse_attention(q, k, v, block_mask, *, block_size, causal: bool = False, scale=None,
                           deterministic: bool = False, implementation=None) -> jax.Array:
    """softmax(scale * q k^T) v over the keys of the blocks that are on.

    Args:
      q: [B, T, N, D]; k: [B, S, K, D]; v: [B, S, K, Dv]; one float dtype, N % K == 0.
      block_mask: bool [B or 1, N or K or 1, ceil(T / bq), ceil(S / bk)]: key j is visible to
        query row i iff block_mask[b, head, i // bq, j // bk]; the head axis is per query
        head (N), per kv head (K) or shared (1).
      block_size: (bq, bk), positive ints; they need not divide T or S.
      causal: additionally, row i (at position p_i = i + S - T) sees only keys j <= p_i.
      scale: defaults to 1 / sqrt(D).
      deterministic: the gradient of q bitwise reproducible (see flash_attention).
      implementation: None, "ffi" or "xla" (see flash_attention).

    Returns:
      [B, T, N, Dv] in q's dtype; zeros for a row that sees no key.
    """
    dims = check_attention_inputs(q, k, v)
    block_size = check_block_size(block_size)
    check_block_mask(block_mask, dims, block_size)
    causal = check_bool("causal", causal)
    deterministic = check_bool("deterministic", deterministic)
    scale = check_scale(scale, dims.D)
    impl = _ffi.resolve_implementation(implementation, [ffi.FWD_TARGET, ffi.BWD_TARGET],
                                      _ffi.cuda_unsupported(q.dtype, dims.D, dims.Dv))
    if impl == "xla":
        return reference.block_sparse_attention(q, k, v, block_mask, block_size=block_size,
                                                causal=causal, scale=scale)
    return ffi.block_sparse_attention(q, k, v, block_mask, block_size=block_size, causal=causal,
                                      scale=scale, deterministic=deterministic)
