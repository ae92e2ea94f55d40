"""The FFI plumbing flash_attention and block_sparse_attention share.

Both ops are one kernel pair with different attributes and, for block-sparse, one extra
operand (the block mask, inserted after v). `attention(kernel, q, k, v, mask)` is their
custom_vjp: the forward target returns (o, lse) and the backward target (dq, dk, dv,
dq_accum) from the saved (q, k, v, o, lse). Each FFI call folds vmap into its batch axis
and runs shard-locally when its inputs are sharded over batch or heads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jax_sparsek import _ffi, _sharding


# Dimension names of the sharding rule: batch "b", query heads "n", kv heads "k"; the
# others never shard ("t"/"s" sequence, "d"/"e" head dims).
_ATTENTION_DIMS = {
    "q": ("b", "t", "n", "d"), "k": ("b", "s", "k", "d"), "v": ("b", "s", "k", "e"),
    "o": ("b", "t", "n", "e"), "lse": ("b", "n", "t"), "do": ("b", "t", "n", "e"),
}


def _mask_dims(shape, sizes) -> tuple[str, ...]:
    """The block mask [Bm, Hm, q blocks, k blocks]: batch and heads shard with q's when it
    has one entry per batch / per query or kv head; a size-1 (shared) axis stays whole."""
    batch = "b" if shape[0] == sizes["b"] and sizes["b"] > 1 else "mask_b"
    heads = ("n" if shape[1] == sizes["n"] else "k") if shape[1] > 1 else "mask_h"
    return (batch, heads, "qb", "kb")


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """One attention kernel pair: FFI target names and the attributes both calls get.

    Hashable, so that it can be a static (nondiff) argument of the custom_vjp."""

    fwd_target: str
    bwd_target: str
    attrs: tuple[tuple[str, Any], ...]
    name: str  # the public op, for sharding warnings

    def _call(self, target: str, result_types, result_dims, operands, mask_index: Optional[int]):
        """ffi_call of `target` on `operands`. `result_types(*operands)` gives the result types
        from the operands the call actually gets (vmap folds into their batch axis, sharding
        hands it one shard); `result_dims` names each result's dimensions for the sharding rule."""

        def call(*ops):
            fn = jax.ffi.ffi_call(target, result_types(*ops), vmap_method="sequential")
            return fn(*ops, **dict(self.attrs))

        def partitioned_call(*ops):
            q, k = ops[0], ops[1]
            sizes = {"b": q.shape[0], "n": q.shape[2], "k": k.shape[2]}
            dims = [_ATTENTION_DIMS[name] for name in ("q", "k", "v")]
            if mask_index is not None:
                dims.append(_mask_dims(ops[mask_index].shape, sizes))
            dims += [_ATTENTION_DIMS[name] for name in ("o", "lse", "do")][:len(ops) - len(dims)]
            return _sharding.partitioned(call, dims, result_dims, sizes=sizes, name=self.name)(*ops)

        # A shared mask (size 1 on its batch axis) stays shared when vmap folds the batch.
        folded = _ffi.fold_vmap(partitioned_call,
                                broadcastable=() if mask_index is None else (mask_index,))
        return folded(*operands)

    def forward(self, q, k, v, mask):
        """(o [B, T, N, Dv] in q's dtype, lse [B, N, T] float32)."""

        def result_types(q, k, v, *_):
            B, T, N, _ = q.shape
            return (_ffi.result_like(q, (B, T, N, v.shape[3])),
                    _ffi.result_like(q, (B, N, T), jnp.float32))

        operands = (q, k, v) if mask is None else (q, k, v, mask)
        return self._call(self.fwd_target, result_types, [_ATTENTION_DIMS["o"], _ATTENTION_DIMS["lse"]],
                          operands, None if mask is None else 3)

    def backward(self, q, k, v, mask, o, lse, do):
        """(dq, dk, dv) in the dtypes of q, k, v."""

        def result_types(q, k, v, *_):
            return (_ffi.result_like(q), _ffi.result_like(k), _ffi.result_like(v),
                    _ffi.result_like(q, dtype=jnp.float32))  # dq_accum: a float32 workspace

        operands = (q, k, v, o, lse, do) if mask is None else (q, k, v, mask, o, lse, do)
        result_dims = [_ATTENTION_DIMS[name] for name in ("q", "k", "v", "q")]
        dq, dk, dv, _ = self._call(self.bwd_target, result_types, result_dims, operands,
                                   None if mask is None else 3)
        return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(kernel: AttentionKernel, q, k, v, mask=None):
    """The attention output of `kernel` (differentiable in q, k, v; `mask` is not)."""
    return kernel.forward(q, k, v, mask)[0]


def _attention_fwd(kernel, q, k, v, mask):
    o, lse = kernel.forward(q, k, v, mask)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(kernel, residuals, do):
    q, k, v, mask, o, lse = residuals
    dq, dk, dv = kernel.backward(q, k, v, mask, o, lse, do.astype(o.dtype))
    return dq, dk, dv, None  # the mask gets no cotangent


attention.defvjp(_attention_fwd, _attention_bwd)
