"""SparseK decoding: `python -m benchmarks.decode`.

The Flax layer's decode step attends to its cache: a window ring [B, K, window, D] with gate 1
and the selection [B, K, k_select, D] with gates clip(u - tau, 0, 1) (jax_sparsek/flax). The
cache's size does not depend on the context length, so neither does this step: its bytes are
what decoding must read (q, the window and selection rows, their gates, o written). Timed
here for a filled cache (fresh random rows, gates in (0, 1], a tenth of the selection empty):
- `jax_sparsek`: the decode kernel once per part, merged by lse (what decode_step runs);
- `jax_sparsek[xla]`: the float32 reference on the concatenated parts (what runs without a
  kernel, and what decode_step ran before the kernel).
rel_err is against that reference at full float32 matmul precision.
Records (BENCHMARKS.md format; S = the cache's entries, window and k_select the layer's; GB/s
on the bytes above) go to benchmarks/results/<device>/<date>-sparsek-decode-b<B>.json.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import problems, report, runner, timing
from jax_sparsek.flax import _common
from jax_sparsek.testing import AttentionSpec

SHAPE = dict(N=32, K=8, D=128, window=512, k_select=1024, dtype="bfloat16")


def cache_parts(B: int, seed: int = 0):
    """q and the two gated parts of a filled SparseK decode cache (SHAPE, batch B)."""
    rng = np.random.default_rng(seed)
    N, K, D, dt = SHAPE["N"], SHAPE["K"], SHAPE["D"], jnp.dtype(SHAPE["dtype"])
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dt)
    q = normal(B, 1, N, D)
    parts = []
    for rows, gate_low, empty in ((SHAPE["window"], 1.0, 0.0), (SHAPE["k_select"], 0.0, 0.1)):
        gate = rng.uniform(gate_low, 1.0, (B, K, rows)).astype(np.float32)
        gate[rng.random((B, K, rows)) < empty] = 0.0
        gate = np.maximum(gate, np.where(gate > 0, 1e-3, 0.0)).astype(np.float32)
        parts.append((normal(B, K, rows, D), normal(B, K, rows, D), jnp.asarray(gate)))
    return q, parts


def spec(B: int) -> AttentionSpec:
    """The step as a one-query SparseK problem over the cache's entries: its FLOPs and bytes
    (q, every cached row and gate read, o written) are the harness's (problems.bytes_moved)."""
    return AttentionSpec(B=B, T=1, S=SHAPE["window"] + SHAPE["k_select"], N=SHAPE["N"],
                         K=SHAPE["K"], D=SHAPE["D"], dtype=SHAPE["dtype"], causal=True,
                         k_select=SHAPE["k_select"], sparsek_window=SHAPE["window"])


def measure(B: int, iters: int, env: dict) -> list[dict]:
    q, parts = cache_parts(B)
    scale = 1.0 / SHAPE["D"] ** 0.5
    with jax.default_matmul_precision("highest"):  # the float32 reference on all the parts
        want = np.asarray(_common._cache_attention(q, parts, scale, implementation="xla"))
    impls = {name: jax.jit(functools.partial(_common._cache_attention, scale=scale,
                                             implementation=implementation))
             for name, implementation in (("jax_sparsek", "ffi"), ("jax_sparsek[xla]", "xla"))}
    target = problems.Target(spec(B))
    records = []
    for name, fn in impls.items():
        ms, out = timing.median_ms(lambda: fn(q, parts), jax.block_until_ready, iters)
        err = runner.rel_err(np.asarray(out, np.float32), want)
        records.append(runner.record(f"sparsek-decode-b{B}", target, name, "fwd", ms, err, env)
                       | {"op": "sparsek_decode"})
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=report.RESULTS, help="results folder")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    env = runner.environment()
    records = [r for B in args.batch for r in measure(B, args.iters, env)]
    if not args.no_save:
        for path in report.save(records, args.out):
            print(f"wrote {path}")
    print(report.table(records))
    print("\n" + report.decode_markdown(records))


if __name__ == "__main__":
    main()
