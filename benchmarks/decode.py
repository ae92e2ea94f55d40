"""SparseK decoding: `python -m benchmarks.decode`.

The Flax layer's decode step attends to its cache: a window ring [B, K, window, D] with gate 1
and the selection [B, K, k_select, D] with gates clip(u - tau, 0, 1) (jax_sparsek/flax). The
cache's size does not depend on the context length, so neither does this step: its bytes are
what decoding must read (q, the window and selection rows, their gates, o written). Timed
here for a filled cache (fresh random rows, gates in (0, 1], a tenth of the selection empty):
- `jax_sparsek`: the decode kernel once per part, merged by lse (what decode_step runs);
- `jax_sparsek[xla]`: the float32 reference on the concatenated parts (what runs without a
  kernel, and what decode_step ran before the kernel).
Records (BENCHMARKS.md format; S = the cache's entries, window and k_select the layer's; GB/s
on the bytes above) go to benchmarks/results/<device>/<date>-sparsek-decode-b<B>.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report, runner, timing
from jax_sparsek import decode
from jax_sparsek.flax import _common

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


def bytes_read(B: int) -> float:
    """q read, the window and selection K/V rows and gates read, o written."""
    N, K, D = SHAPE["N"], SHAPE["K"], SHAPE["D"]
    rows = SHAPE["window"] + SHAPE["k_select"]
    size = jnp.dtype(SHAPE["dtype"]).itemsize
    return float(size * (2 * B * N * D + 2 * B * K * rows * D) + 4 * B * K * rows)


def measure(B: int, iters: int, env: dict) -> list[dict]:
    q, parts = cache_parts(B)
    scale = 1.0 / SHAPE["D"] ** 0.5
    k, v, gate = (jnp.concatenate(xs, axis=2) for xs in zip(*parts))
    want = np.asarray(decode.reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32), gate, scale=scale,
                                       heads_first=True)[0])
    impls = {
        "jax_sparsek": jax.jit(lambda q, parts: _common._cache_attention(q, parts, scale)),
        "jax_sparsek[xla]": jax.jit(lambda q, parts: decode.reference(
            q.astype(jnp.float32), *(jnp.concatenate(xs, axis=2) for xs in zip(*parts)),
            scale=scale, heads_first=True)[0]),
    }
    rows = SHAPE["window"] + SHAPE["k_select"]
    flops = 4 * B * SHAPE["N"] * rows * SHAPE["D"]
    records = []
    for name, fn in impls.items():
        ms, out = timing.median_ms(lambda: fn(q, parts), jax.block_until_ready, iters)
        records.append({
            "preset": f"sparsek-decode-b{B}", "op": "sparsek_decode", "impl": name, "pass": "fwd",
            "B": B, "T": 1, "S": rows, "N": SHAPE["N"], "K": SHAPE["K"], "D": SHAPE["D"],
            "dtype": SHAPE["dtype"], "causal": True, "window": SHAPE["window"],
            "k_select": SHAPE["k_select"], "ms": ms, "tflops": flops / (ms * 1e9),
            "us_per_head": ms * 1e3 / SHAPE["N"], "gbps": bytes_read(B) / (ms * 1e6),
            "rel_err": runner.rel_err(np.asarray(out, np.float32), want), **env})
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    env = runner.environment()
    records = [r for B in args.batch for r in measure(B, args.iters, env)]
    for path in report.save(records):
        print(f"wrote {path}")
    print(f"{'preset':22s} {'impl':18s} {'us':>9s} {'GB/s':>8s} {'of 2.97 TB/s':>13s} {'rel_err':>8s}")
    for r in records:
        print(f"{r['preset']:22s} {r['impl']:18s} {r['ms'] * 1e3:9.1f} {r['gbps']:8.0f} "
              f"{r['gbps'] / (report.HBM_BYTES_PER_S / 1e9):12.0%} {r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
