"""Pure-JAX references of every op (`implementation="xla"`): the definitions the kernels
are tested against, written for clarity rather than speed (they build [T, S] scores)."""

from jax_sparsek.block_sparse.reference import block_sparse_attention
from jax_sparsek.flash_attention.reference import flash_attention
from jax_sparsek.sparsek.operator import sparsek, sparsek_threshold
from jax_sparsek.sparsek.reference import sparsek_attention

__all__ = ["block_sparse_attention", "flash_attention", "sparsek", "sparsek_attention",
           "sparsek_threshold"]
