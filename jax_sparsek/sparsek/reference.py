"""Pure-JAX reference of SparseK attention (SPEC.md section 4): the definition the kernels are
tested against. It builds the dense [T, S] gate matrix per (batch, kv head), so it is meant for
clarity and modest sizes; gradients reach q, k, v and scores by plain autodiff (the scores'
gradient flows through tau via `sparsek_threshold`'s VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_sparsek._validation import (AttentionDims, check_attention_inputs, check_bool, check_int,
                                     check_scale)
from jax_sparsek.sparsek.operator import sparsek_threshold


def check_sparsek_inputs(q, k, v, scores, k_select, window, causal, scale):
    """Validates the arguments of sparsek_attention; returns (dims, k_select, window, causal, scale)."""
    dims: AttentionDims = check_attention_inputs(q, k, v)
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise TypeError(f"scores must be an array, got {type(scores).__name__}")
    want = (dims.B, dims.S, dims.K)
    if tuple(scores.shape) != want:
        raise ValueError(f"scores must have shape [B, S, K] = {list(want)} (one score per key and kv "
                         f"head), got {tuple(scores.shape)}")
    if jnp.dtype(scores.dtype) != jnp.float32:
        raise TypeError(f"scores must be float32, got {jnp.dtype(scores.dtype)}")
    k_select = check_int("k_select", k_select, 1)
    window = check_int("window", window, 0)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, dims.D)
    # Equivalent smaller values for very large arguments (k_select >= S selects every candidate;
    # a window of S + T covers every key in both modes), so that they fit int32 index math.
    k_select = min(k_select, dims.S)
    window = min(window, dims.S + dims.T)
    return dims, k_select, window, causal, scale


def query_positions(T: int, S: int) -> jax.Array:
    """p_i = i + S - T: bottom-right alignment of the T queries against the S keys."""
    return jnp.arange(T) + (S - T)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def selection(scores, num_queries: int, k_select: int, window: int, causal: bool):
    """The selection every query makes, densely.

    Returns (tau [B, K, T'], kth [B, K, T'], candidate [T', S], selected [B, K, T', S], window_mask
    [T, S]) with T' = num_queries when causal and 1 otherwise (one selection shared by all
    queries). kth is the index of the k_select-th largest candidate, -1 when a query has at
    most k_select candidates (all selected, tau = -inf).
    """
    B, S, K = scores.shape
    T = num_queries
    u = jnp.transpose(scores, (0, 2, 1))  # [B, K, S]
    pos = query_positions(T, S)[:, None]
    j = jnp.arange(S)[None, :]
    if causal:
        window_mask = (j <= pos) & (j > pos - window)
        candidate = j <= pos - window
    else:
        window_mask = jnp.abs(pos - j) < window
        candidate = jnp.ones((1, S), bool)
    masked = jnp.where(candidate, u[:, :, None, :], -jnp.inf)  # [B, K, T', S]
    tau = sparsek_threshold(masked, k_select)

    # The k_select-th largest candidate in the (score, index) order: its score theta is the
    # k_select-th largest score; among the candidates scoring theta, the ones ranked before it
    # are those with larger indices, so it is the r-th largest index of them.
    top = min(k_select, S)
    stopped = jax.lax.stop_gradient(masked)
    kth_score = jax.lax.top_k(stopped, top)[0][..., top - 1:top]
    rank_among_ties = k_select - jnp.sum(stopped > kth_score, axis=-1, keepdims=True)  # r >= 1
    tie_index = jnp.where(stopped == kth_score, j, -1)
    kth_index = jnp.take_along_axis(jax.lax.top_k(tie_index, top)[0],
                                    jnp.clip(rank_among_ties - 1, 0, top - 1), axis=-1)
    kth_score, kth_index = kth_score[..., 0], kth_index[..., 0]
    enough = jnp.sum(jnp.broadcast_to(candidate, masked.shape), axis=-1) > k_select
    at_least_kth = (u[:, :, None, :] > kth_score[..., None]) | (
        (u[:, :, None, :] == kth_score[..., None]) & (j >= kth_index[..., None]))
    selected = candidate & (at_least_kth | ~enough[..., None])
    kth = jnp.where(enough, kth_index, -1).astype(jnp.int32)
    return tau, kth, candidate, selected, window_mask


def gates(scores, num_queries: int, k_select: int, window: int, causal: bool):
    """g [B, K, T, S]: 1 on the window, m_ij = clip(u_j - tau_i, 0, 1) on the selection, 0 else."""
    B, S, K = scores.shape
    tau, _, _, selected, window_mask = selection(scores, num_queries, k_select, window, causal)
    u = jnp.transpose(scores, (0, 2, 1))[:, :, None, :]
    # clip(u - tau, 0, 1) with derivative 1 only strictly inside (0, 1), as the operator's VJP:
    # jnp.clip would give 1/2 at a bound, and with a flat f the root sits exactly where the
    # k-th key's m is 1 (there the output is locally constant in u).
    d = u - tau[..., None]  # tau = -inf gives +inf: m = 1
    soft = jnp.where(d >= 1.0, 1.0, jnp.where(d <= 0.0, 0.0, d))
    g = jnp.where(window_mask, 1.0, jnp.where(selected, soft, 0.0))
    return jnp.broadcast_to(g, (B, K, num_queries, S))


@functools.partial(jax.jit, static_argnames=("k_select", "window", "causal", "scale"))
def sparsek_attention_dense(q, k, v, scores, *, k_select: int, window: int, causal: bool, scale: float):
    """SparseK attention with no argument checks, in the inputs' precision promoted to at least
    float32 (float64 inputs under `jax.experimental.enable_x64` compute in float64)."""
    B, T, N, D = q.shape
    K = k.shape[2]
    G = N // K
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q32, k32, v32 = (x.astype(acc) for x in (q, k, v))
    g = gates(scores.astype(jnp.promote_types(scores.dtype, acc)), T, k_select, window, causal)
    g = g.astype(acc)[:, :, None]  # [B, K, 1, T, S]
    qg = q32.reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k32) * scale
    on = g > 0
    # Softmax of s + log g over the positive gates, shifted by the row max for stability.
    row_max = jax.lax.stop_gradient(jnp.max(jnp.where(on, s, -jnp.inf), axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    w = jnp.where(on, g * jnp.exp(jnp.where(on, s, row_max) - row_max), 0.0)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    p = w / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v32)
    return o.reshape(B, T, N, v.shape[-1]).astype(q.dtype)


def sparsek_attention(q, k, v, scores, *, k_select: int, window: int, causal: bool = True,
                      scale: float | None = None):
    """Reference SparseK attention (SPEC.md section 4).

    q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv], scores float32 [B, S, K]. Each query attends
    its local window (gate 1) and the k_select best candidates before it (gate m_ij from the
    SparseK projection of the candidates' scores), softmax weighted by the gates.
    """
    _, k_select, window, causal, scale = check_sparsek_inputs(q, k, v, scores, k_select, window,
                                                              causal, scale)
    return sparsek_attention_dense(q, k, v, scores, k_select=k_select, window=window,
                                   causal=causal, scale=scale)
