"""Flax layers over `jax_sparsek.sparsek_attention`.

`jax_sparsek.flax.SparseKAttention` is the Flax NNX layer; `jax_sparsek.flax.linen.SparseKAttention`
is the same layer for Linen (same parameter names and shapes, same outputs for the same weights).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sparsek.flax import _common
from jax_sparsek.flax._common import PARAM_NAMES, AttentionConfig, SparseKCache

__all__ = ["SparseKAttention", "SparseKCache", "AttentionConfig", "PARAM_NAMES"]


class SparseKAttention(nnx.Module):
    """Causal self-attention with learnt sparse key selection (SparseK), Flax NNX.

    Every query attends to the last `window` tokens (itself included) and to the `k_select`
    earlier tokens with the highest importance score, each weighted inside the softmax by
    its SparseK gate clip(u_j - tau, 0, 1) (SPEC section 4). The score of a token is
    u = x W_u + slope * position, one per kv head (queries of a group share their kv head's
    selection), in float32.

    Args:
      in_features: model width E (input and output features).
      num_heads: query heads N.
      k_select: keys selected beyond the window, per query and kv head.
      window: local window size (>= 1; the query's own token counts).
      num_kv_heads: kv heads K (N % K == 0); defaults to N.
      head_dim: defaults to E // N.
      causal: False gives the bidirectional form (one selection shared by all queries);
        decoding needs True.
      rope, rope_theta: rotary position embedding of q and k.
      dtype: computation dtype (None: promote input and parameters); param_dtype.
      implementation: passed to `sparsek_attention` (None, "ffi" or "xla").
      cache_slack: extra entries of the decode cache's score buffer beyond k_select
        (default k_select); see `SparseKCache` for when decoding is exact.

    Usage::

      layer = SparseKAttention(256, 8, k_select=64, window=128, num_kv_heads=2,
                               rngs=nnx.Rngs(0))
      y = layer(x)                                   # x [B, T, 256], positions 0..T-1
      cache = layer.init_cache(batch_size=B)         # or: y, cache = layer.prefill(x)
      y_t, cache = layer.decode_step(x_t, cache)     # x_t [B, 256], position cache.pos
    """

    def __init__(self, in_features: int, num_heads: int, *, k_select: int, window: int,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 causal: bool = True, rope: bool = True, rope_theta: float = 10000.0,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 implementation: Optional[str] = None, cache_slack: Optional[int] = None,
                 rngs: nnx.Rngs):
        self.config = _common.make_config(
            features=in_features, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, k_select=k_select, window=window, causal=causal, rope=rope,
            rope_theta=rope_theta, dtype=dtype, param_dtype=param_dtype,
            implementation=implementation, cache_slack=cache_slack)
        for name, (init, shape) in _common.param_initializers(self.config).items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))

    def _params(self) -> dict:
        return {name: getattr(self, name)[...] for name in PARAM_NAMES}

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] at positions 0..T-1 -> [B, T, E]."""
        return _common.forward(self._params(), x, self.config)

    def init_cache(self, batch_size: int, dtype: Any = None) -> SparseKCache:
        """An empty decode cache for `batch_size` sequences (K/V stored in `dtype`, default the
        computation dtype). Its size depends on window, k_select and cache_slack only."""
        if dtype is None:
            dtype = self.config.dtype or jnp.result_type(jnp.float32, self.config.param_dtype)
        return _common.init_cache(self.config, batch_size, dtype)

    def decode_step(self, x_t: jax.Array, cache: SparseKCache) -> tuple[jax.Array, SparseKCache]:
        """The next token of every sequence: x_t [B, E] (or [B, 1, E]) at position cache.pos ->
        (y_t of the same shape, the updated cache). Pure in the cache, so it can run under
        jax.jit / nnx.jit and as the body of a jax.lax.scan."""
        squeeze = x_t.ndim == 3
        if squeeze:
            if x_t.shape[1] != 1:
                raise ValueError(f"decode_step takes one token, got x_t of shape {x_t.shape}; "
                                 "use decode() for several")
            x_t = x_t[:, 0]
        if x_t.ndim != 2 or x_t.shape[-1] != self.config.features:
            raise ValueError(f"x_t must have shape [batch, {self.config.features}], got "
                             f"{tuple(x_t.shape)}")
        y, cache = _common.decode_step(self._params(), x_t, cache, self.config)
        return (y[:, None] if squeeze else y), cache

    def decode(self, x: jax.Array, cache: SparseKCache) -> tuple[jax.Array, SparseKCache]:
        """decode_step over the T tokens of x [B, T, E] in order (one jax.lax.scan)."""
        _common.check_input(x, self.config)
        return _common.decode(self._params(), x, cache, self.config)

    def prefill(self, x: jax.Array, cache_dtype: Any = None) -> tuple[jax.Array, SparseKCache]:
        """The full forward over x [B, T, E] (one parallel pass) and the decode cache it
        leaves, ready for position T."""
        return _common.prefill(self._params(), x, self.config, cache_dtype)
