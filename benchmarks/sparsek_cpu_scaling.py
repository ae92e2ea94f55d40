"""CPU scaling of SparseK attention: time of the forward and of forward+backward at S and 4S.

Each query attends window + k_select keys, so the time should grow about 4x (linear in S),
not 16x (quadratic). Run: `PYTHONPATH=. python benchmarks/sparsek_cpu_scaling.py [--seq 2048]`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jax_sparsek import sparsek_attention


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_at(S: int, args) -> tuple[float, float]:
    keys = jax.random.split(jax.random.key(0), 4)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (args.batch, S, args.heads, args.head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (args.batch, S, args.kv_heads, args.head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (args.batch, S, args.kv_heads, args.head_dim)).astype(dtype)
    scores = 2.0 * jax.random.normal(keys[3], (args.batch, S, args.kv_heads))
    opts = dict(k_select=args.k_select, window=args.window, causal=True, implementation="ffi")

    fwd = jax.jit(lambda q, k, v, s: sparsek_attention(q, k, v, s, **opts))
    loss = lambda q, k, v, s: jnp.sum(sparsek_attention(q, k, v, s, **opts).astype(jnp.float32))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return (median_seconds(fwd, q, k, v, scores, repeats=args.repeats),
            median_seconds(fwd_bwd, q, k, v, scores, repeats=args.repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="S; the second point is 4 S")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--k-select", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"SparseK attention on {jax.devices()[0].device_kind}: B{args.batch} N{args.heads} "
          f"K{args.kv_heads} D{args.head_dim} {args.dtype}, k_select={args.k_select}, "
          f"window={args.window}, causal")
    results = {S: time_at(S, args) for S in (args.seq, 4 * args.seq)}
    for S, (fwd, fwd_bwd) in results.items():
        print(f"S={S:6d}  fwd {fwd * 1e3:9.2f} ms   fwd+bwd {fwd_bwd * 1e3:9.2f} ms")
    (f1, b1), (f4, b4) = results.values()
    print(f"ratio 4S/S: fwd {f4 / f1:.2f}x   fwd+bwd {b4 / b1:.2f}x   (linear: 4x, quadratic: 16x)")


if __name__ == "__main__":
    main()
