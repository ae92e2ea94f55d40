"""Pure-JAX flash_attention (SPEC.md section 1): a masked softmax in float32 over a [T, S]
score matrix. It defines what the kernels compute and is differentiable by jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek._validation import check_attention_inputs, check_bool, check_scale


def check_window(window) -> tuple[int, int]:
    """`window` = None or (left, right), each an int >= 0 or None (unbounded on that side).

    Returns (left, right) with -1 for an unbounded side, as the FFI attributes spell it."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints >= 0 or None, "
                        f"got {window!r}")
    bounds = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            bounds.append(-1)
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"window {side} bound must be an int >= 0 or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window {side} bound must be >= 0 (None for unbounded), got {w}")
        bounds.append(int(w))
    return bounds[0], bounds[1]


def visible_keys(T: int, S: int, *, causal: bool, left: int = -1, right: int = -1) -> jax.Array:
    """[T, S] bool: key j is visible to query row i (positions aligned bottom-right)."""
    pos = jnp.arange(T)[:, None] + (S - T)
    j = jnp.arange(S)[None, :]
    visible = jnp.ones((T, S), bool)
    if causal:
        visible &= j <= pos
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    return visible


def masked_attention(q, k, v, visible, scale: float) -> jax.Array:
    """softmax(scale q k^T) v over the keys where `visible` ([B|1, N|1, T, S]) is True.

    Float32 throughout, result in q's dtype; a row with no visible key gives zeros, and no
    NaN reaches the value or its gradients."""
    N, K = q.shape[2], k.shape[2]
    hi = jax.lax.Precision.HIGHEST
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    k32 = jnp.repeat(k32, N // K, axis=2)  # query head h reads kv head h // (N // K)
    v32 = jnp.repeat(v32, N // K, axis=2)
    s = jnp.einsum("btnd,bsnd->bnts", q32, k32, precision=hi) * scale
    s = jnp.where(visible, s, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(s - row_max)  # exactly 0 where masked
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bnts,bsne->btne", p, v32, precision=hi).astype(q.dtype)


def flash_attention(q, k, v, *, causal: bool = False, window=None, scale=None) -> jax.Array:
    """Reference of jax_sparsek.flash_attention (same arguments, no `implementation` and no
    `deterministic`: it always is)."""
    dims = check_attention_inputs(q, k, v)
    causal = check_bool("causal", causal)
    left, right = check_window(window)
    scale = check_scale(scale, dims.D)
    visible = visible_keys(dims.T, dims.S, causal=causal, left=left, right=right)
    return masked_attention(q, k, v, visible[None, None], scale)
