"""jax-sparsek: fused SparseK, flash and block-sparse attention for JAX (XLA FFI kernels).

Importing the package loads the compiled extension and registers every FFI target once;
the ops themselves load on first use.
"""

from __future__ import annotations

import importlib

from jax_sparsek import _ffi  # noqa: F401  (registers the FFI targets)

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "flash_attention": "jax_sparsek.flash_attention",
    "block_sparse_attention": "jax_sparsek.block_sparse",
    "sparsek": "jax_sparsek.sparsek",
    "sparsek_threshold": "jax_sparsek.sparsek",
    "sparsek_attention": "jax_sparsek.sparsek",
}
_SUBMODULES = ("reference", "flax")

__all__ = sorted(_API) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"jax_sparsek.{name}")
    else:
        raise AttributeError(f"module 'jax_sparsek' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
