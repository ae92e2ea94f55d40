"""SparseK: the soft top-k operator and SparseK attention (SPEC.md sections 3 and 4)."""

from jax_sparsek.sparsek.operator import sparsek, sparsek_threshold
from jax_sparsek.sparsek.reference import sparsek_attention

__all__ = ["sparsek", "sparsek_threshold", "sparsek_attention"]
