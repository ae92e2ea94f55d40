"""Argument checks shared by every op. They run on shapes and dtypes only (at trace time),
so bad input raises a clear ValueError / TypeError before any kernel is launched."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionDims(NamedTuple):
    B: int
    T: int
    S: int
    N: int
    K: int
    D: int
    Dv: int


def _dtype_name(x) -> str:
    return str(jnp.dtype(x.dtype))


def check_attention_inputs(q, k, v) -> AttentionDims:
    """q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv]; one float dtype; N % K == 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            want = {"q": "[B, T, N, D]", "k": "[B, S, K, D]", "v": "[B, S, K, Dv]"}[name]
            raise ValueError(f"{name} must have shape {want} (rank 4), got shape {tuple(x.shape)}")
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {_dtype_name(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got {_dtype_name(q)}, {_dtype_name(k)}, {_dtype_name(v)}")
    B, T, N, D = q.shape
    _, S, K, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, S, K, D={D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B={B}, S={S}, K={K}, Dv] to match k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    if K == 0 or N % K != 0:
        raise ValueError(f"the number of query heads N={N} (q.shape[2]) must be a multiple of the "
                         f"number of kv heads K={K} (k.shape[2])")
    if min(B, T, S, N, D, v.shape[3]) == 0:
        raise ValueError(f"q, k and v must be non-empty, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return AttentionDims(B, T, S, N, K, D, v.shape[3])


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float (static), got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool (static), got {type(value).__name__}")
    return bool(value)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
