"""Pure-JAX references of every op (`implementation="xla"`): the definitions the kernels
are tested against, written for clarity rather than speed (they build [T, S] scores)."""

from __future__ import annotations

import importlib

_REFERENCES = {
    "flash_attention": "jax_sparsek.flash_attention.reference",
    "block_sparse_attention": "jax_sparsek.block_sparse.reference",
    "sparsek_attention": "jax_sparsek.sparsek.reference",
    "sparsek": "jax_sparsek.sparsek.operator",
    "sparsek_threshold": "jax_sparsek.sparsek.operator",
}
__all__ = sorted(_REFERENCES)


def __getattr__(name: str):
    if name not in _REFERENCES:
        raise AttributeError(f"module 'jax_sparsek.reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(_REFERENCES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
