"""SparseK attention through the FFI kernels: the three targets (select, forward, backward;
their contracts are documented in cpp/sparsek/sparsek_ffi.cc) and the custom_vjp tying them.

The selection (tau, kth per query) runs once, in the same call as the forward, and is saved
for the backward with o and lse. Both calls fold vmap into their batch axis and shard over
batch and heads with no communication (every (batch, kv head) is independent).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek import _ffi
from jax_sparsek._sharding import partitioned

SELECT_TARGET = "jax_sparsek_sparsek_select"
FWD_TARGET = "jax_sparsek_sparsek_fwd"
BWD_TARGET = "jax_sparsek_sparsek_bwd"
TARGETS = (SELECT_TARGET, FWD_TARGET, BWD_TARGET)

# Named dimensions of every operand and result, for the sharding rules ("b" batch, "n" query
# heads, "k" kv heads; the rest stays whole on each shard).
_Q, _KV, _V, _SCORES, _SEL = ("b", "t", "n", "d"), ("b", "s", "k", "d"), ("b", "s", "k", "e"), \
    ("b", "s", "k"), ("b", "k", "t")
_O, _LSE = ("b", "t", "n", "e"), ("b", "n", "t")


def _ffi_call(target, results, operands, attrs):
    return tuple(jax.ffi.ffi_call(target, results, vmap_method="sequential")(*operands, **attrs))


def _batched(body, operands, dims_in=None, dims_out=None, heads=None, name=""):
    """body(*operands) -> tuple of arrays, with vmap folded into the batch axis and, given the
    named dims of its operands and results, batch and head shardings run shard-locally. The
    body builds its FFI result types from the operands it receives (folded, or one shard's)."""

    def run(*ops):
        fn = body
        if dims_in is not None:
            N, K = heads(*ops)
            fn = partitioned(body, dims_in, dims_out, sizes={"b": ops[0].shape[0], "n": N, "k": K},
                             name=name)
        return fn(*ops)

    return _ffi.fold_vmap(run)(*operands)


def _select_call(scores, num_queries, k_select, window, causal):
    B, _, K = scores.shape
    results = (_ffi.result_like(scores, (B, K, num_queries), jnp.float32),
               _ffi.result_like(scores, (B, K, num_queries), jnp.int32))
    attrs = dict(k_select=np.int64(k_select), window=np.int64(window), causal=bool(causal),
                 num_queries=np.int64(num_queries))
    return _ffi_call(SELECT_TARGET, results, (scores,), attrs)


def _attrs(scale, k_select, window, causal):
    return dict(scale=np.float32(scale), k_select=np.int64(k_select), window=np.int64(window),
                causal=bool(causal))


def select(scores, *, num_queries: int, k_select: int, window: int, causal: bool):
    """(tau f32 [B, K, T], kth s32 [B, K, T]) for scores f32 [B, S, K] (no sharding rule of
    its own: inside sparsek_attention it runs in the forward's partitioned call)."""
    body = lambda s: _select_call(s, num_queries, k_select, window, causal)
    return _batched(body, (scores,))


def forward(q, k, v, scores, *, scale, k_select, window, causal):
    """Selection then forward: (o [B, T, N, Dv] in q's dtype, lse f32 [B, N, T], tau, kth)."""

    def body(q, k, v, scores):
        B, T, N, _ = q.shape
        tau, kth = _select_call(scores, T, k_select, window, causal)
        results = (_ffi.result_like(q, (B, T, N, v.shape[3])),
                   _ffi.result_like(q, (B, N, T), jnp.float32))
        o, lse = _ffi_call(FWD_TARGET, results, (q, k, v, scores, tau, kth),
                           _attrs(scale, k_select, window, causal))
        return o, lse, tau, kth

    return _batched(body, (q, k, v, scores), [_Q, _KV, _V, _SCORES], [_O, _LSE, _SEL, _SEL],
                    lambda q, k, *_: (q.shape[2], k.shape[2]), FWD_TARGET)


def backward(q, k, v, scores, tau, kth, o, lse, do, *, scale, k_select, window, causal):
    """(dq, dk, dv in the dtypes of q, k, v; dscores f32 [B, S, K])."""

    def body(q, k, v, scores, *rest):
        results = (_ffi.result_like(q), _ffi.result_like(k), _ffi.result_like(v),
                   _ffi.result_like(scores, dtype=jnp.float32))
        return _ffi_call(BWD_TARGET, results, (q, k, v, scores, *rest),
                         _attrs(scale, k_select, window, causal))

    return _batched(body, (q, k, v, scores, tau, kth, o, lse, do),
                    [_Q, _KV, _V, _SCORES, _SEL, _SEL, _O, _LSE, _O], [_Q, _KV, _V, _SCORES],
                    lambda q, k, *_: (q.shape[2], k.shape[2]), BWD_TARGET)


def _forward_with_residuals(q, k, v, scores, k_select, window, causal, scale):
    o, lse, tau, kth = forward(q, k, v, scores, scale=scale, k_select=k_select, window=window,
                               causal=causal)
    return o, (q, k, v, scores, tau, kth, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def sparsek_attention_ffi(q, k, v, scores, k_select: int, window: int, causal: bool, scale: float):
    """SparseK attention by the FFI kernels (arguments already validated)."""
    return _forward_with_residuals(q, k, v, scores, k_select, window, causal, scale)[0]


def _vjp_bwd(k_select, window, causal, scale, residuals, do):
    q, k, v, scores, tau, kth, o, lse = residuals
    return backward(q, k, v, scores, tau, kth, o, lse, do.astype(o.dtype), scale=scale,
                    k_select=k_select, window=window, causal=causal)


sparsek_attention_ffi.defvjp(_forward_with_residuals, _vjp_bwd)
