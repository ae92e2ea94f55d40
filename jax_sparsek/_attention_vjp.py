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
from typing import Any

import jax
import jax.numpy as jnp

from jax_sparsek import _ffi, decode


# Dimension names of each FFI operand and result for the sharding rule: batch "b", query
# heads "n", kv heads "k"; the others never shard ("t"/"s" sequence, "d"/"e" head dims).
_DIMS = {
    "q": ("b", "t", "n", "d"), "k": ("b", "s", "k", "d"), "v": ("b", "s", "k", "e"),
    "o": ("b", "t", "n", "e"), "lse": ("b", "n", "t"), "do": ("b", "t", "n", "e"),
    "dq": ("b", "t", "n", "d"), "dk": ("b", "s", "k", "d"), "dv": ("b", "s", "k", "e"),
    "dq_accum": ("b", "t", "n", "d"),
}


def _mask_dims(shape, sizes) -> tuple[str, ...]:
    """The block mask [Bm, Hm, q blocks, k blocks]: batch and heads shard with q's when it
    has one entry per batch / per query or kv head; a size-1 (shared) axis stays whole."""
    batch = "b" if shape[0] == sizes["b"] and sizes["b"] > 1 else "mask_b"
    heads = ("n" if shape[1] == sizes["n"] else "k") if shape[1] > 1 else "mask_h"
    return (batch, heads, "qb", "kb")


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """One attention kernel pair: FFI target names, the attributes both calls get and those
    only the backward gets.

    Hashable, so that it can be a static (nondiff) argument of the custom_vjp."""

    fwd_target: str
    bwd_target: str
    attrs: tuple[tuple[str, Any], ...]
    bwd_attrs: tuple[tuple[str, Any], ...]
    name: str  # the public op, for sharding warnings
    # With one query row (decoding), the forward runs the decode kernel over the keys from
    # this index on (jax_sparsek.decode); its (o, lse) are the flash forward's (lse in natural
    # log), so the backward is the unchanged flash backward kernel.
    decode_key_begin: int | None = None

    def _call(self, target: str, operands: dict, result_types, results: tuple[str, ...],
              attrs: dict):
        """ffi_call of `target` on `operands` ({name: array}, in the target's order).

        `result_types(ops)` builds the result types from the operands the call actually gets:
        vmap folds into their batch axis and sharding hands the call one shard."""
        names = tuple(operands)

        def body(*ops):
            ops = dict(zip(names, ops))
            fn = jax.ffi.ffi_call(target, result_types(ops), vmap_method="sequential")
            return fn(*ops.values(), **attrs)

        def operand_dims(*ops):
            sizes = {"b": ops[0].shape[0], "n": ops[0].shape[2], "k": ops[1].shape[2]}
            return [_mask_dims(x.shape, sizes) if n == "mask" else _DIMS[n]
                    for n, x in zip(names, ops)]

        # A shared mask (size 1 on its batch axis) stays shared when vmap folds the batch.
        broadcastable = (names.index("mask"),) if "mask" in names else ()
        return _ffi.batched_call(body, tuple(operands.values()), operand_dims,
                                 [_DIMS[n] for n in results], name=self.name,
                                 broadcastable=broadcastable)

    def forward(self, q, k, v, mask):
        """(o [B, T, N, Dv] in q's dtype, lse [B, N, T] float32)."""
        if self.decode_key_begin is not None:
            return decode.decode_forward(q, k, v, scale=dict(self.attrs)["scale"],
                                         key_begin=self.decode_key_begin)

        def result_types(ops):
            B, T, N, _ = ops["q"].shape
            return (_ffi.result_like(ops["q"], (B, T, N, ops["v"].shape[3])),
                    _ffi.result_like(ops["q"], (B, N, T), jnp.float32))

        operands = dict(q=q, k=k, v=v) if mask is None else dict(q=q, k=k, v=v, mask=mask)
        return self._call(self.fwd_target, operands, result_types, ("o", "lse"), dict(self.attrs))

    def backward(self, q, k, v, mask, o, lse, do):
        """(dq, dk, dv) in the dtypes of q, k, v."""

        def result_types(ops):
            return (_ffi.result_like(ops["q"]), _ffi.result_like(ops["k"]),
                    _ffi.result_like(ops["v"]),
                    _ffi.result_like(ops["q"], dtype=jnp.float32))  # dq_accum: float32 workspace

        operands = dict(q=q, k=k, v=v) if mask is None else dict(q=q, k=k, v=v, mask=mask)
        operands.update(o=o, lse=lse, do=do)
        dq, dk, dv, _ = self._call(self.bwd_target, operands, result_types,
                                   ("dq", "dk", "dv", "dq_accum"),
                                   dict(self.attrs + self.bwd_attrs))
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
