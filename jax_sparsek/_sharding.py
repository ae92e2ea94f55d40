"""Sharding rules for the FFI ops: batch and head axes shard with no communication.

Each FFI call is wrapped in `custom_partitioning` with a Shardy rule built from named
dimensions ("b" batch, "n" query heads, "k" kv heads, anything else local to one shard).
Query heads are the compound factor (k g) with g = N // K, so a mesh axis that shards the
query heads shards the kv heads the same way and every shard keeps whole GQA groups. Any
other sharded dimension (sequence, head dim) is gathered before the call, with a warning.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

Dims = Sequence[str]  # one factor name per array dimension


def _rule(dims_list: Sequence[Dims]) -> str:
    return ", ".join(" ".join("(k g)" if d == "n" else d for d in dims) for dims in dims_list)


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _local_factors(operands, results, shardable) -> tuple[str, ...]:
    # Shardy wants special factors in the order they first appear in the rule.
    seen = []
    for dims in (*operands, *results):
        for d in dims:
            if d not in shardable and d not in seen:
                seen.append(d)
    return tuple(seen)


def partitioned(fn: Callable, operands: Sequence[Dims], results: Sequence[Dims], *,
                sizes: dict[str, int], name: str) -> Callable:
    """Wraps `fn(*arrays) -> tuple of arrays` so that batch ("b") and head ("n"/"k")
    shardings of its operands run shard-locally. `sizes` holds the global sizes of "b",
    "n" and "k"; `name` names the op in warnings."""
    group = sizes["n"] // sizes["k"]
    shardable = ("b", "n", "k")

    def choose(mesh, arg_shapes):
        # Mesh axes for the batch and for the heads, read off the first operand that has them.
        axes = {}
        for dims, shape in zip(operands, arg_shapes):
            spec = tuple(shape.sharding.spec) + (None,) * (len(dims) - len(shape.sharding.spec))
            for d, s in zip(dims, spec):
                if s is not None and d not in shardable:
                    warnings.warn(f"{name}: sharding along dimension '{d}' is not supported; the "
                                  "operand is gathered along it (shard batch or heads instead)",
                                  stacklevel=2)
                key = "heads" if d in ("n", "k") else d
                if d in shardable and s is not None and key not in axes:
                    axes[key] = s
        if "b" in axes and sizes["b"] % _axes_size(mesh, axes["b"]):
            warnings.warn(f"{name}: batch {sizes['b']} does not divide over mesh axes {axes['b']}; "
                          "gathering the batch", stacklevel=2)
            del axes["b"]
        if "heads" in axes and sizes["k"] % _axes_size(mesh, axes["heads"]):
            warnings.warn(f"{name}: {sizes['k']} kv heads do not divide over mesh axes "
                          f"{axes['heads']}; gathering the heads", stacklevel=2)
            del axes["heads"]
        return axes

    def spec(axes, dims, shape=None):
        parts = []
        for i, d in enumerate(dims):
            key = "heads" if d in ("n", "k") else d
            # A broadcast (size-1) operand dimension stays whole.
            keep = key in axes and (shape is None or shape[i] != 1)
            parts.append(axes[key] if keep else None)
        return PartitionSpec(*parts)

    def partition(mesh, arg_shapes, result_shape):
        axes = choose(mesh, arg_shapes)
        arg_sh = tuple(NamedSharding(mesh, spec(axes, d, s.shape)) for d, s in zip(operands, arg_shapes))
        res_sh = tuple(NamedSharding(mesh, spec(axes, d)) for d in results)
        return mesh, fn, res_sh, arg_sh

    def infer(mesh, arg_shapes, result_shape):
        axes = choose(mesh, arg_shapes)
        return tuple(NamedSharding(mesh, spec(axes, d)) for d in results)

    wrapped = custom_partitioning(fn)
    rule = _rule(operands) + " -> " + _rule(results)
    wrapped.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                          need_replication_factors=_local_factors(operands, results, shardable),
                          g=group)
    return wrapped
