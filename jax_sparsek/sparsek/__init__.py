"""SparseK: the soft top-k operator and SparseK attention (SPEC.md sections 3 and 4)."""

from __future__ import annotations

from jax_sparsek import _ffi
from jax_sparsek.sparsek import ffi as _sparsek_ffi
from jax_sparsek.sparsek import reference as _reference
from jax_sparsek.sparsek.operator import sparsek, sparsek_threshold

__all__ = ["sparsek", "sparsek_threshold", "sparsek_attention"]


def sparsek_attention(q, k, v, scores, *, k_select: int, window: int, causal: bool = True,
                      scale: float | None = None, implementation: str | None = None):
    """SparseK attention (SPEC.md section 4): each query attends its local window and the
    `k_select` best-scored candidate keys, the latter weighted by a differentiable soft mask.

    Args:
      q: [B, T, N, D]; k: [B, S, K, D]; v: [B, S, K, Dv] (one float dtype; N % K == 0).
      scores: float32 [B, S, K], one importance score per key and kv head.
      k_select: keys selected per query (int >= 1).
      window: local window length (int >= 0); causal: query i at position p_i = i + S - T
        sees the window p_i - window < j <= p_i and selects among j <= p_i - window;
        non-causal: one selection over all keys, window |p_i - j| < window.
      scale: logit scale, 1/sqrt(D) by default.
      implementation: None (the FFI kernels when this build has them for the default
        backend and, on CUDA, the inputs are bf16/fp16 with D = Dv in {64, 128}; else the
        reference), "ffi" or "xla" (the pure-JAX reference).

    Returns [B, T, N, Dv] in q's dtype; differentiable w.r.t. q, k, v and scores.
    """
    _, k_select, window, causal, scale = _reference.check_sparsek_inputs(
        q, k, v, scores, k_select, window, causal, scale)
    platform = _ffi.default_platform()
    unsupported = _ffi.cuda_unsupported(q.dtype, q.shape[3], v.shape[3])
    if _ffi.resolve_implementation(implementation, _sparsek_ffi.targets_for(platform),
                                   unsupported) == "xla":
        return _reference.sparsek_attention_dense(q, k, v, scores, k_select=k_select,
                                                  window=window, causal=causal, scale=scale)
    return _sparsek_ffi.sparsek_attention_ffi(q, k, v, scores, k_select, window, causal, scale,
                                              "cuda" if platform == "cuda" else "cpu")
