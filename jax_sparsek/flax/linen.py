"""SparseKAttention for Flax Linen (the NNX layer is `jax_sparsek.flax.SparseKAttention`)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_sparsek.flax import _common
from jax_sparsek.flax._common import PARAM_NAMES, SparseKCache

__all__ = ["SparseKAttention", "SparseKCache"]


class SparseKAttention(nn.Module):
    """Causal self-attention with learnt sparse key selection (SparseK), Flax Linen.

    The same layer as `jax_sparsek.flax.SparseKAttention` (NNX): parameters q_kernel,
    k_kernel, v_kernel, out_kernel, score_kernel, score_slope with the same shapes, and the
    same output for the same weights. The model width E is taken from the input.

    Attributes:
      num_heads, k_select, window, num_kv_heads, head_dim, causal, rope, rope_theta, dtype,
      param_dtype, implementation, cache_slack: as in the NNX layer.

    Decoding uses the 'cache' collection, whose arrays do not grow with the sequence
    (fields of `SparseKCache`)::

      cache = model.init(rng, x[:, :1], decode=True)["cache"]        # empty, batch of x
      y_t, upd = model.apply({"params": params, "cache": cache}, x_t, decode=True,
                             mutable=["cache"])                     # x_t [B, T, E]
      cache = upd["cache"]

    With decode=True the T tokens of x are decoded one after another (a lax.scan), starting
    at the cache's position. With prefill=True as well, x is processed in one parallel pass
    from position 0 and the cache is overwritten by the state it leaves.
    """

    num_heads: int
    k_select: int
    window: int
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    causal: bool = True
    rope: bool = True
    rope_theta: float = 10000.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: Optional[str] = None
    cache_slack: Optional[int] = None

    def config(self, features: int) -> _common.AttentionConfig:
        return _common.make_config(
            features=features, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, k_select=self.k_select, window=self.window,
            causal=self.causal, rope=self.rope, rope_theta=self.rope_theta, dtype=self.dtype,
            param_dtype=self.param_dtype, implementation=self.implementation,
            cache_slack=self.cache_slack)

    @nn.compact
    def __call__(self, x: jax.Array, *, decode: bool = False, prefill: bool = False) -> jax.Array:
        """x [B, T, E] -> [B, T, E]; without decode, x sits at positions 0..T-1."""
        cfg = self.config(x.shape[-1])
        _common.check_input(x, cfg)
        params = {name: self.param(name, init, shape, self.param_dtype)
                  for name, (init, shape) in _common.param_initializers(cfg).items()}
        if not decode:
            if prefill:
                raise ValueError("prefill=True needs decode=True")
            return _common.forward(params, x, cfg)

        had_cache = self.has_variable("cache", "pos")
        shapes = _common.cache_shapes(cfg, x.shape[0], _common.compute_dtype(cfg, x))
        variables = {name: self.variable("cache", name, _common.empty_cache_field, name, shape)
                     for name, shape in shapes.items()}
        if prefill:
            y, cache = _common.prefill(params, x, cfg)
        elif had_cache:
            cache = SparseKCache(**{name: var.value for name, var in variables.items()})
            y, cache = _common.decode(params, x, cache, cfg)
        else:  # model.init(..., decode=True): the empty cache was just created
            return _common.forward(params, x, cfg)
        for name, var in variables.items():
            var.value = getattr(cache, name)
        return y


def params_to_nnx(layer, params) -> None:
    """Copies Linen parameters (the 'params' dict of this layer) into an NNX SparseKAttention."""
    for name in PARAM_NAMES:
        getattr(layer, name)[...] = jnp.asarray(params[name])


def params_from_nnx(layer) -> dict:
    """The Linen parameter dict of an NNX SparseKAttention's weights."""
    return {name: getattr(layer, name)[...] for name in PARAM_NAMES}
