"""Loads the compiled extension, checks it against the installed jaxlib, registers every
FFI target once, and holds the helpers every op's FFI wrapper shares."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import jaxlib

from jax_sparsek._sharding import shard_local

try:
    from jax_sparsek import _jax_sparsek_ext as _ext
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "jax_sparsek's compiled extension (_jax_sparsek_ext) could not be loaded from "
        f"{__file__.rsplit('/', 1)[0]}. Install the package (`pip install .`) and import it from "
        "outside its source tree, or build in place for development (`tools/dev_build.sh`, "
        "then PYTHONPATH=<source tree>)"
    ) from e


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


BUILT_AGAINST_JAXLIB: str = _ext.built_against_jaxlib
WITH_CUDA: bool = bool(_ext.with_cuda)

if _version_tuple(jaxlib.__version__) < _version_tuple(BUILT_AGAINST_JAXLIB):
    raise ImportError(
        f"jax_sparsek was built against jaxlib {BUILT_AGAINST_JAXLIB}, but jaxlib "
        f"{jaxlib.__version__} is installed. XLA FFI handlers only load on the jaxlib they were "
        "built with or a newer one: upgrade jaxlib, or rebuild jax_sparsek against this jaxlib "
        "(`pip install --no-build-isolation .`)."
    )

# {target name: {platform}} for what this build registered.
_TARGETS: dict[str, set[str]] = {}
for _name, _platform, _capsule in _ext.registrations():
    jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
    _TARGETS.setdefault(_name, set()).add(_platform.lower())


def extension():
    """The compiled extension module (workspace-size functions of the CUDA targets)."""
    return _ext


def has_target(name: str, platform: str) -> bool:
    """Whether this build has an FFI handler `name` for `platform` ("cpu" or "cuda")."""
    return platform.lower() in _TARGETS.get(name, ())


def default_platform() -> str:
    """The platform new computations run on: `jax.default_device` when one is set, else the
    default backend's ("cpu" or "cuda")."""
    device = jax.config.jax_default_device
    if isinstance(device, str):
        platform = device
    elif device is not None:
        platform = device.platform
    else:
        platform = jax.default_backend()
    return platform.lower().replace("gpu", "cuda")


def cuda_unsupported(dtype, head_dim: int, value_head_dim: int) -> str | None:
    """Why the CUDA kernels (every op's: they take 16-bit inputs and one head dim of 64 or 128
    for q, k and v) can't run inputs of this dtype and head dims, or None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"take bfloat16 or float16 inputs, got {jnp.dtype(dtype)}"
    if head_dim not in (64, 128) or value_head_dim != head_dim:
        return f"take head dims 64 or 128 with Dv == D, got D={head_dim}, Dv={value_head_dim}"
    return None


def resolve_implementation(implementation: str | None, targets: Sequence[str],
                           cuda_limit: str | None = None) -> str:
    """Maps the user's `implementation=` to "ffi" or "xla".

    None picks the FFI kernels when this build has them for the default backend (and, on a
    GPU, when `cuda_limit`, cuda_unsupported's answer, names no limit of the CUDA kernels that
    this call hits) and the pure-JAX reference otherwise; "ffi" insists on the kernels.
    """
    if implementation not in (None, "ffi", "xla"):
        raise ValueError(f'implementation must be None, "ffi" or "xla", got {implementation!r}')
    if implementation == "xla":
        return "xla"
    platform = default_platform()
    reason = None
    if not all(has_target(t, platform) for t in targets):
        reason = (f"this build has no {platform} kernel for {', '.join(targets)} "
                  f"(CUDA kernels: {'built' if WITH_CUDA else 'not built'})")
    elif platform == "cuda" and cuda_limit:
        reason = f"the CUDA kernels {cuda_limit}"
    if reason is None:
        return "ffi"
    if implementation == "ffi":
        raise ValueError(f'implementation="ffi": {reason}')
    return "xla"


def result_like(x: jax.Array, shape: Sequence[int] | None = None, dtype=None):
    """A result type built from an input's type, so that it keeps the input's sharding and
    manual axes (plain ShapeDtypeStructs fail the type check under shard_map)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    shape = tuple(aval.shape if shape is None else shape)
    dtype = aval.dtype if dtype is None else jnp.dtype(dtype)
    if hasattr(aval, "update"):
        try:
            return aval.update(shape=shape, dtype=dtype)
        except Exception:  # sharding of the input does not fit the new shape
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


def fold_vmap(fn: Callable, *, broadcastable: Sequence[int] = ()) -> Callable:
    """Makes `fn(*arrays)`, whose array arguments and results all carry the batch on axis 0,
    batch under `jax.vmap` by folding the mapped axis into that batch axis: one kernel
    launch over V*B instead of V launches.

    Arguments listed in `broadcastable` may have size 1 on axis 0 (shared by the whole
    batch); they stay shared when unmapped.
    """

    @jax.custom_batching.custom_vmap
    def batched_fn(*args):
        return fn(*args)

    @batched_fn.def_vmap
    def rule(axis_size, in_batched, *args):
        batch = next(a.shape[1] if b else a.shape[0]
                     for i, (a, b) in enumerate(zip(args, in_batched)) if i not in broadcastable)
        folded = []
        for i, (a, b) in enumerate(zip(args, in_batched)):
            if not b:
                if i in broadcastable and a.shape[0] == 1:
                    folded.append(a)
                    continue
                a = jnp.broadcast_to(a[None], (axis_size,) + a.shape)
            if a.shape[1] != batch:  # a shared (size-1) argument mapped over V
                a = jnp.broadcast_to(a, (axis_size, batch) + a.shape[2:])
            folded.append(a.reshape((axis_size * batch,) + a.shape[2:]))
        out = batched_fn(*folded)
        unfold = lambda o: o.reshape((axis_size, batch) + o.shape[1:])
        out = jax.tree_util.tree_map(unfold, out)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return batched_fn


def batched_call(body: Callable, operands: Sequence, operand_dims, result_dims, *, name: str,
                 broadcastable: Sequence[int] = ()):
    """Runs `body(*operands) -> tuple of arrays` (the op's FFI calls, which build their result
    types from the operands they receive) with vmap folded into the batch axis and batch /
    head shardings run shard-locally (see _sharding.shard_local for the dims)."""
    local = shard_local(body, operand_dims, result_dims, name=name)
    return fold_vmap(local, broadcastable=broadcastable)(*operands)
