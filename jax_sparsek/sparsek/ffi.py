"""SparseK attention through the FFI kernels: the three raw calls (select, forward, backward;
their contracts are documented in cpp/sparsek/sparsek_ffi.cc) and the custom_vjp tying them.

The selection (tau, kth per query) runs once in the forward and is saved for the backward,
with o and lse. Every raw call folds vmap into its batch axis and shards over batch and heads.
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


def _raw_call(target, results, operands, dims_in, dims_out, sizes, attrs):
    """One FFI call, vmap folded into the batch axis; sharded over batch and heads by the
    named dims (None: no sharding rule, the call sees whole arrays). `results(*operands)`
    gives the result types (evaluated on the folded operands under vmap)."""

    def run(*ops):
        call = jax.ffi.ffi_call(target, results(*ops), vmap_method="sequential")
        fn = lambda *xs: tuple(call(*xs, **attrs))
        if dims_in is not None:
            fn = partitioned(fn, dims_in, dims_out, sizes={"b": ops[0].shape[0], **sizes},
                             name=target)
        return fn(*ops)

    return _ffi.fold_vmap(run)(*operands)


def select(scores, *, num_queries: int, k_select: int, window: int, causal: bool):
    """(tau f32 [B, K, T], kth s32 [B, K, T]) for scores f32 [B, S, K]."""
    def results(scores):
        B, _, K = scores.shape
        return (_ffi.result_like(scores, (B, K, num_queries), jnp.float32),
                _ffi.result_like(scores, (B, K, num_queries), jnp.int32))

    attrs = dict(k_select=np.int64(k_select), window=np.int64(window), causal=bool(causal),
                 num_queries=np.int64(num_queries))
    return _raw_call(SELECT_TARGET, results, (scores,), None, None, None, attrs)


def _attrs(scale, k_select, window, causal):
    return dict(scale=np.float32(scale), k_select=np.int64(k_select), window=np.int64(window),
                causal=bool(causal))


def forward(q, k, v, scores, tau, kth, *, scale, k_select, window, causal):
    """(o [B, T, N, Dv] in q's dtype, lse f32 [B, N, T])."""
    def results(q, k, v, *_):
        B, T, N, _ = q.shape
        return (_ffi.result_like(q, (B, T, N, v.shape[3])),
                _ffi.result_like(q, (B, N, T), jnp.float32))

    return _raw_call(FWD_TARGET, results, (q, k, v, scores, tau, kth),
                     [_Q, _KV, _V, _SCORES, _SEL, _SEL], [_O, _LSE], {"n": q.shape[2], "k": k.shape[2]},
                     _attrs(scale, k_select, window, causal))


def backward(q, k, v, scores, tau, kth, o, lse, do, *, scale, k_select, window, causal):
    """(dq, dk, dv in the dtypes of q, k, v; dscores f32 [B, S, K])."""
    def results(q, k, v, scores, *_):
        return (_ffi.result_like(q), _ffi.result_like(k), _ffi.result_like(v),
                _ffi.result_like(scores, dtype=jnp.float32))

    return _raw_call(BWD_TARGET, results, (q, k, v, scores, tau, kth, o, lse, do),
                     [_Q, _KV, _V, _SCORES, _SEL, _SEL, _O, _LSE, _O], [_Q, _KV, _V, _SCORES],
                     {"n": q.shape[2], "k": k.shape[2]}, _attrs(scale, k_select, window, causal))


def _forward_with_residuals(q, k, v, scores, k_select, window, causal, scale):
    tau, kth = select(scores, num_queries=q.shape[1], k_select=k_select, window=window,
                      causal=causal)
    o, lse = forward(q, k, v, scores, tau, kth, scale=scale, k_select=k_select, window=window,
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
