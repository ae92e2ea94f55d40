"""jax-sparsek: fused SparseK, flash and block-sparse attention for JAX (XLA FFI kernels).

Importing the package loads the compiled extension and registers every FFI target once.
"""

from __future__ import annotations

from jax_sparsek import _ffi  # noqa: F401  (registers the FFI targets)
from jax_sparsek import reference
from jax_sparsek.block_sparse import block_sparse_attention
from jax_sparsek.flash_attention import flash_attention
from jax_sparsek.sparsek import sparsek, sparsek_attention, sparsek_threshold

__version__ = "0.1.0"

__all__ = [
    "block_sparse_attention",
    "flash_attention",
    "reference",
    "sparsek",
    "sparsek_attention",
    "sparsek_threshold",
]
