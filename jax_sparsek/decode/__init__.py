"""Decode attention: one query per (batch, head) against a cache of R entries, each entry
optionally weighted (target jax_sparsek_decode_fwd, contract in cpp/decode/ffi_bindings.h).

Two users: `flash_attention` with one query row (T == 1: decoding the newest token against
k/v [B, S, K, D]), and the SparseK decode step of the Flax layer, whose cache keeps the window
and the selection as [B, K, R, D] with a gate per entry. The CUDA kernel reads each K/V row
once for the query heads of its GQA group and splits the entries over enough CTAs to fill the
GPU; the CPU kernel is one pass per (batch, head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek import _ffi

TARGET = "jax_sparsek_decode_fwd"
# Split sizing (the CUDA kernel takes up to 4 query heads per CTA, kHeadsPerCta in
# cpp/decode/cuda/decode_kernel.cu, and runs 4 CTAs per SM; its splits are multiples of 64
# entries, cpp/decode/splits.h):
# about four waves of CTAs on a 132-SM H100, so that the last, partial wave costs little, and
# no split shorter than 512 entries (each split adds a merge row per head and a CTA start).
# Measured on the H100 (benchmarks/NOTES.md): one wave of CTAs left decode128k at 2.1 TB/s,
# four waves reach 2.8; short caches (SparseK's window and selection) were fastest with the
# fewest splits.
_HEADS_PER_CTA, _TARGET_CTAS, _MIN_SPLIT = 4, 2112, 512


def num_splits(batch: int, kv_heads: int, group: int, entries: int) -> int:
    """Splits of each (batch, kv head)'s entries for the CUDA kernel (the CPU kernel ignores them)."""
    ctas = max(1, batch * kv_heads * -(-group // _HEADS_PER_CTA))
    return max(1, min(-(-entries // _MIN_SPLIT), -(-_TARGET_CTAS // ctas)))


def decode_forward(q, k, v, key_weight=None, *, scale: float, key_begin: int = 0,
                   heads_first: bool = False):
    """(o [B, 1, N, D] in q's dtype, lse [B, N, 1] float32) by the FFI kernel.

    q [B, 1, N, D]; k, v [B, R, K, D] (or [B, K, R, D] with heads_first); key_weight float32
    [B, K, R] or None (weight 1), gates in [0, 1] (much larger weights can overflow the
    kernels' sums); entries before key_begin are not read. Arguments are validated by the
    caller; the kernels check shapes again."""
    kv_dims = ("b", "k", "s", "d") if heads_first else ("b", "s", "k", "d")
    if key_weight is None:  # an empty weight array keeps the operand list fixed
        B, K = q.shape[0], (k.shape[1] if heads_first else k.shape[2])
        key_weight = jnp.zeros((B, K, 0), jnp.float32)
        weight_dims = ("b", "k", "none")
    else:
        weight_dims = ("b", "k", "s")

    def body(q, k, v, key_weight):
        B, _, N, D = q.shape
        K, R = (k.shape[1], k.shape[2]) if heads_first else (k.shape[2], k.shape[1])
        splits = num_splits(B, K, N // K, max(R - key_begin, 0))
        results = (_ffi.result_like(q), _ffi.result_like(q, (B, N, 1), jnp.float32),
                   _ffi.result_like(q, (B, N, splits, D + 1), jnp.float32))
        call = jax.ffi.ffi_call(TARGET, results, vmap_method="sequential")
        o, lse, _ = call(q, k, v, key_weight, scale=np.float32(scale),
                         key_begin=np.int64(key_begin), heads_first=bool(heads_first))
        return o, lse

    operand_dims = [("b", "t", "n", "d"), kv_dims, kv_dims, weight_dims]
    return _ffi.batched_call(body, (q, k, v, key_weight), operand_dims,
                             [("b", "t", "n", "d"), ("b", "n", "t")], name="decode attention")


def reference(q, k, v, key_weight, *, scale: float, heads_first: bool):
    """(o, lse) of decode_forward in float32 jnp (weights <= 0 mask their entries)."""
    B, _, N, D = q.shape
    if not heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    K = k.shape[1]
    qg = q[:, 0].astype(jnp.float32).reshape(B, K, N // K, D)
    logits = scale * jnp.einsum("bkgd,bkrd->bkgr", qg, k.astype(jnp.float32))
    on = (key_weight > 0)[:, :, None, :]
    logits = jnp.where(on, logits + jnp.log(jnp.where(on, key_weight[:, :, None, :], 1.0)), -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    o = jnp.einsum("bkgr,bkrd->bkgd", weights / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + row_max, -jnp.inf)
    return o.reshape(B, 1, N, D).astype(q.dtype), lse.reshape(B, N, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_decode_attention(q, k, v, key_weight, scale: float):
    """(o [B, 1, N, D], lse [B, N, 1]) of q against a heads-first cache k, v [B, K, R, D] whose
    entries weigh key_weight [B, K, R] (<= 0: masked) by the FFI kernel, differentiable in q,
    k, v and key_weight (the backward differentiates the float32 reference)."""
    return decode_forward(q, k, v, key_weight, scale=scale, heads_first=True)


def _weighted_fwd(q, k, v, key_weight, scale):
    out = decode_forward(q, k, v, key_weight, scale=scale, heads_first=True)
    return out, (q, k, v, key_weight)


def _weighted_bwd(scale, residuals, cotangents):
    _, vjp = jax.vjp(lambda *a: reference(*a, scale=scale, heads_first=True), *residuals)
    return vjp(cotangents)


weighted_decode_attention.defvjp(_weighted_fwd, _weighted_bwd)
