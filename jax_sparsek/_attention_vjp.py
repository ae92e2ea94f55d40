"""The FFI plumbing flash_attention and block_sparse_attention share.

Both ops are one kernel pair with different attributes and, for block-sparse, one extra
operand (the block mask, inserted after v). `attention(kernel, q, k, v, mask)` is their
custom_vjp: the forward target returns (o, lse) and the backward target (dq, dk, dv,
dq_accum) from the saved (q, k, v, o, lse). Each FFI call folds vmap into its batch axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jax_sparsek import _ffi


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """One attention kernel pair: FFI target names and the attributes both calls get.

    Hashable, so that it can be a static (nondiff) argument of the custom_vjp."""

    fwd_target: str
    bwd_target: str
    attrs: tuple[tuple[str, Any], ...]

    def _call(self, target: str, result_types, operands, mask_index: Optional[int]):
        """ffi_call of `target` on `operands`; `result_types(*operands)` gives the result
        types from the operands the call actually gets (vmap folds into their batch axis)."""

        def call(*ops):
            fn = jax.ffi.ffi_call(target, result_types(*ops), vmap_method="sequential")
            return fn(*ops, **dict(self.attrs))

        # A shared mask (size 1 on its batch axis) stays shared when vmap folds the batch.
        folded = _ffi.fold_vmap(call, broadcastable=() if mask_index is None else (mask_index,))
        return folded(*operands)

    def forward(self, q, k, v, mask):
        """(o [B, T, N, Dv] in q's dtype, lse [B, N, T] float32)."""

        def result_types(q, k, v, *_):
            B, T, N, _ = q.shape
            return (_ffi.result_like(q, (B, T, N, v.shape[3])),
                    _ffi.result_like(q, (B, N, T), jnp.float32))

        operands = (q, k, v) if mask is None else (q, k, v, mask)
        return self._call(self.fwd_target, result_types, operands, None if mask is None else 3)

    def backward(self, q, k, v, mask, o, lse, do):
        """(dq, dk, dv) in the dtypes of q, k, v."""

        def result_types(q, k, v, *_):
            return (_ffi.result_like(q), _ffi.result_like(k), _ffi.result_like(v),
                    _ffi.result_like(q, dtype=jnp.float32))  # dq_accum: a float32 workspace

        operands = (q, k, v, o, lse, do) if mask is None else (q, k, v, mask, o, lse, do)
        dq, dk, dv, _ = self._call(self.bwd_target, result_types, operands,
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
