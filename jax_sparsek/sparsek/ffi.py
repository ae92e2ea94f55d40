"""SparseK attention through the FFI kernels: select, forward and backward targets and the
custom_vjp tying them. Two pipelines with the same math:
- "cpu" (contracts in cpp/sparsek/sparsek_ffi.cc): select gives tau and kth per query;
- "cuda" (cpp/sparsek/cuda/ffi_handlers.cu): select also lists, per tile of 128 queries,
  the keys the tile selects, which the forward and backward gather, and ranks every key by score
  (one compare decides whether a query selects a listed key); workspaces are results.

The selection runs once, in the same call as the forward, and is saved for the backward with
o and lse. Both calls fold vmap into their batch axis and shard over batch and heads with no
communication (every (batch, kv head) is independent).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek import _ffi

SELECT_TARGET = "jax_sparsek_sparsek_select"
FWD_TARGET = "jax_sparsek_sparsek_fwd"
BWD_TARGET = "jax_sparsek_sparsek_bwd"
TARGETS = (SELECT_TARGET, FWD_TARGET, BWD_TARGET)
CUDA_SELECT_TARGET = "jax_sparsek_sparsek_select_cuda"
CUDA_FWD_TARGET = "jax_sparsek_sparsek_fwd_cuda"
CUDA_BWD_TARGET = "jax_sparsek_sparsek_bwd_cuda"
CUDA_TARGETS = (CUDA_SELECT_TARGET, CUDA_FWD_TARGET, CUDA_BWD_TARGET)


def targets_for(platform: str) -> tuple[str, ...]:
    return CUDA_TARGETS if platform == "cuda" else TARGETS

# Named dimensions of every operand and result, for the sharding rules ("b" batch, "n" query
# heads, "k" kv heads; the rest stays whole on each shard).
_Q, _KV, _V, _SCORES, _SEL = ("b", "t", "n", "d"), ("b", "s", "k", "d"), ("b", "s", "k", "e"), \
    ("b", "s", "k"), ("b", "k", "t")
_O, _LSE = ("b", "t", "n", "e"), ("b", "n", "t")
_TILE_KEYS, _TILE_COUNT, _KEY_RANK = ("b", "k", "tile", "slot"), ("b", "k", "tile"), ("b", "k", "s")
_KEY_LISTS = [_TILE_KEYS, _TILE_COUNT, _KEY_RANK]


def _ffi_call(target, results, operands, attrs):
    return tuple(jax.ffi.ffi_call(target, results, vmap_method="sequential")(*operands, **attrs))


def _select_attrs(num_queries, k_select, window, causal):
    return dict(k_select=np.int64(k_select), window=np.int64(window), causal=bool(causal),
                num_queries=np.int64(num_queries))


def _select_call(scores, num_queries, k_select, window, causal):
    B, _, K = scores.shape
    results = (_ffi.result_like(scores, (B, K, num_queries), jnp.float32),
               _ffi.result_like(scores, (B, K, num_queries), jnp.int32))
    return _ffi_call(SELECT_TARGET, results, (scores,),
                     _select_attrs(num_queries, k_select, window, causal))


def _workspace(x, nbytes: int):
    """A uint8 workspace result of at least `nbytes`, shaped [B, n, 1, ...] like `x` so that it
    keeps x's sharding and manual axes."""
    per_batch = -(-max(int(nbytes), 1) // max(x.shape[0], 1))
    return _ffi.result_like(x, (x.shape[0], per_batch) + (1,) * (x.ndim - 2), jnp.uint8)


def _select_call_cuda(scores, num_queries, k_select, window, causal):
    """(tau, kth, tile_keys, tile_count, key_rank) by the CUDA selection."""
    B, S, K = scores.shape
    window = min(window, S + num_queries)
    tile = _ffi.extension().sparsek_tile_queries  # queries per key list
    tiles = -(-num_queries // tile)
    capacity = min(k_select, S) + tile  # SparsekDims::list_capacity
    nbytes = _ffi.extension().sparsek_select_workspace_bytes(B, num_queries, S, K, k_select,
                                                             window, causal)
    results = (_ffi.result_like(scores, (B, K, num_queries), jnp.float32),
               _ffi.result_like(scores, (B, K, num_queries), jnp.int32),
               _ffi.result_like(scores, (B, K, tiles, capacity), jnp.int32),
               _ffi.result_like(scores, (B, K, tiles), jnp.int32),
               _ffi.result_like(scores, (B, K, S), jnp.int32),
               _workspace(scores, nbytes))
    out = _ffi_call(CUDA_SELECT_TARGET, results, (scores,),
                    _select_attrs(num_queries, k_select, window, causal))
    return out[:5]


def _attrs(scale, k_select, window, causal):
    return dict(scale=np.float32(scale), k_select=np.int64(k_select), window=np.int64(window),
                causal=bool(causal))


def select(scores, *, num_queries: int, k_select: int, window: int, causal: bool,
           platform: str = "cpu"):
    """(tau f32 [B, K, T], kth s32 [B, K, T]) for scores f32 [B, S, K] (no sharding rule of
    its own: inside sparsek_attention it runs in the forward's partitioned call)."""
    call = _select_call_cuda if platform == "cuda" else _select_call
    body = lambda s: tuple(call(s, num_queries, k_select, window, causal)[:2])
    return _ffi.fold_vmap(body)(scores)


def forward(q, k, v, scores, *, scale, k_select, window, causal, platform="cpu"):
    """Selection then forward: (o [B, T, N, Dv] in q's dtype, lse f32 [B, N, T], selection),
    the selection being (tau, kth) on the CPU and (tau, kth, tile_keys, tile_count, key_rank)
    on CUDA."""
    cuda = platform == "cuda"

    def body(q, k, v, scores):
        B, T, N, _ = q.shape
        select = _select_call_cuda if cuda else _select_call
        selection = tuple(select(scores, T, k_select, window, causal))
        results = (_ffi.result_like(q, (B, T, N, v.shape[3])),
                   _ffi.result_like(q, (B, N, T), jnp.float32))
        o, lse = _ffi_call(CUDA_FWD_TARGET if cuda else FWD_TARGET, results,
                           (q, k, v, scores, *selection), _attrs(scale, k_select, window, causal))
        return (o, lse, *selection)

    selection_dims = [_SEL, _SEL] + (_KEY_LISTS if cuda else [])
    out = _ffi.batched_call(body, (q, k, v, scores), [_Q, _KV, _V, _SCORES],
                            [_O, _LSE, *selection_dims], name="sparsek_attention")
    return out[0], out[1], tuple(out[2:])


def backward(q, k, v, scores, selection, o, lse, do, *, scale, k_select, window, causal,
             platform="cpu"):
    """(dq, dk, dv in the dtypes of q, k, v; dscores f32 [B, S, K])."""
    cuda = platform == "cuda"

    def body(q, k, v, scores, *rest):
        results = (_ffi.result_like(q), _ffi.result_like(k), _ffi.result_like(v),
                   _ffi.result_like(scores, dtype=jnp.float32))
        if cuda:
            B, T, N, D = q.shape
            _, S, K, _ = k.shape
            nbytes = _ffi.extension().sparsek_backward_workspace_bytes(
                B, T, S, N, K, D, k_select, min(window, S + T), causal)
            results = results + (_workspace(q, nbytes),)
        out = _ffi_call(CUDA_BWD_TARGET if cuda else BWD_TARGET, results, (q, k, v, scores, *rest),
                        _attrs(scale, k_select, window, causal))
        return out[:4]

    selection_dims = [_SEL, _SEL] + (_KEY_LISTS if cuda else [])
    return _ffi.batched_call(body, (q, k, v, scores, *selection, o, lse, do),
                             [_Q, _KV, _V, _SCORES, *selection_dims, _O, _LSE, _O],
                             [_Q, _KV, _V, _SCORES], name="sparsek_attention")


def _forward_with_residuals(q, k, v, scores, k_select, window, causal, scale, platform):
    o, lse, selection = forward(q, k, v, scores, scale=scale, k_select=k_select, window=window,
                                causal=causal, platform=platform)
    return o, (q, k, v, scores, selection, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def sparsek_attention_ffi(q, k, v, scores, k_select: int, window: int, causal: bool, scale: float,
                          platform: str):
    """SparseK attention by the FFI kernels of `platform` ("cpu" or "cuda"; arguments already
    validated)."""
    return _forward_with_residuals(q, k, v, scores, k_select, window, causal, scale, platform)[0]


def _vjp_bwd(k_select, window, causal, scale, platform, residuals, do):
    q, k, v, scores, selection, o, lse = residuals
    return backward(q, k, v, scores, selection, o, lse, do.astype(o.dtype), scale=scale,
                    k_select=k_select, window=window, causal=causal, platform=platform)


sparsek_attention_ffi.defvjp(_forward_with_residuals, _vjp_bwd)
