"""Sanitizer runs and timings of the CUDA SparseK kernels (correctness lives in
tests/sparsek/test_sparsek_cuda.py). Run on an H100 from the repository root after building
(`tools/dev_build.sh -DJAX_SPARSEK_CUDA=ON`):

    PYTHONPATH=. python3 cpp/sparsek/cuda/check_and_time.py sanitize   # memcheck, racecheck
    PYTHONPATH=. python3 cpp/sparsek/cuda/check_and_time.py time       # the BENCHMARKS presets
    PYTHONPATH=. python3 cpp/sparsek/cuda/check_and_time.py chunks     # attention cost per chunk

`time` reports, per preset, the median of the selection alone, the forward and forward+backward
next to jax.nn's cuDNN kernel on the same q, k, v (dense causal and the causal sliding window
with as many keys per query as SparseK attends). `chunks` splits the forward's attention part
(forward minus selection) by what its CTAs do: per (k_select, window) of seed003's shape and
at long32k, the 128-key chunks per CTA (window and listed, from the selection's tile counts)
and the attention time per chunk and SM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
# (name, B, S, N, D, dtype, k_select, window)
PRESETS = [("sparsek-seed003", 16, 4096, 96, 128, "float16", 256, 256),
           ("sparsek-long32k", 1, 32768, 16, 128, "bfloat16", 1024, 512)]


def inputs(B, T, S, N, K, D, dtype, seed=0):
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, D), dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), dtype)
    scores = 2.0 * jax.random.normal(keys[3], (B, S, K), jnp.float32)
    return q, k, v, scores


def sanitize_body():
    import jax
    import jax.numpy as jnp
    from jax_sparsek import sparsek_attention
    for (B, T, S, N, K, D, k_sel, w, causal) in [(1, 200, 200, 4, 2, 64, 24, 16, True),
                                                   (1, 1, 700, 4, 4, 128, 40, 32, True),
                                                   (2, 96, 130, 2, 2, 64, 20, 8, False),
                                                   (1, 300, 300, 2, 1, 128, 200, 200, True)]:
        q, k, v, scores = inputs(B, T, S, N, K, D, jnp.bfloat16)
        f = lambda q, k, v, s: sparsek_attention(q, k, v, s, k_select=k_sel, window=w,
                                                 causal=causal).astype(jnp.float32).sum()
        jax.block_until_ready(jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, scores))
    print("sanitize body done", flush=True)


def sanitize():
    """memcheck, then racecheck (shared-memory hazards of the gather kernels' stages), on the
    small calls of sanitize_body; $SANITIZE_TOOLS picks a subset."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    for tool in os.environ.get("SANITIZE_TOOLS", "memcheck,racecheck").split(","):
        cmd = ["compute-sanitizer", f"--tool={tool}", "--kernel-name", "kns=jax_sparsek",
               "--print-limit", "10", sys.executable, HERE, "sanitize-body"]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            print(f"{tool}: timed out after 150 s", flush=True)
            continue
        out = (r.stdout + r.stderr).splitlines()
        lines = [l for l in out if "SUMMARY" in l or "done" in l or "Invalid" in l
                 or "Error" in l or "Race" in l or "hazard" in l.lower()]
        if r.returncode != 0:  # show what went wrong, not only the summary lines
            lines = out[-20:]
        print("\n".join(lines[:20]), f"\n{tool} rc={r.returncode}", flush=True)


def median_ms(fn, *args, iters=10):
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_presets():
    import jax
    import jax.numpy as jnp
    from jax_sparsek import sparsek_attention
    from jax_sparsek.sparsek import ffi as sparsek_ffi
    rows = []
    for name, B, S, N, D, dtype, k_sel, w in PRESETS:
        q, k, v, scores = inputs(B, S, S, N, N, D, jnp.dtype(dtype))
        ours = jax.jit(lambda q, k, v, s: sparsek_attention(q, k, v, s, k_select=k_sel, window=w))
        sel = jax.jit(lambda s: sparsek_ffi.select(s, num_queries=S, k_select=k_sel, window=w,
                                                     causal=True, platform="cuda"))
        loss = lambda f: jax.jit(jax.grad(lambda q, k, v, *s: f(q, k, v, *s).astype(jnp.float32).sum(),
                                          argnums=(0, 1, 2)))
        ours_bwd = jax.jit(jax.grad(lambda q, k, v, s: ours(q, k, v, s).astype(jnp.float32).sum(),
                                    argnums=(0, 1, 2, 3)))
        dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        keys = w + k_sel
        window = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(keys - 1, 0), implementation="cudnn")
        flops = 4.0 * B * N * S * keys * D
        for label, fn, args in [("selection", sel, (scores,)),
                                ("sparsek fwd", ours, (q, k, v, scores)),
                                ("sparsek fwd+bwd", ours_bwd, (q, k, v, scores)),
                                ("cudnn causal fwd", jax.jit(dense), (q, k, v)),
                                ("cudnn causal fwd+bwd", loss(dense), (q, k, v)),
                                (f"cudnn window {keys} fwd", jax.jit(window), (q, k, v)),
                                (f"cudnn window {keys} fwd+bwd", loss(window), (q, k, v))]:
            try:
                ms = median_ms(fn, *args)
            except Exception as e:  # a peer that does not fit or lacks a feature
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            tf = flops / ms * 1e-9 * (3.5 if "bwd" in label else 1.0)
            rows.append((name, label, ms, tf, ms * 1e3 / N))
            print(f"{name:16s} {label:28s} {ms:9.3f} ms", flush=True)
    print(f"\n{'preset':16s} {'what':28s} {'ms':>9s} {'TF/s@keys':>10s} {'us/head':>9s}")
    for name, label, ms, tf, us in rows:
        print(f"{name:16s} {label:28s} {ms:9.3f} {tf:10.1f} {us:9.1f}")


def chunk_costs():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax_sparsek import sparsek_attention
    from jax_sparsek.sparsek import ffi as sparsek_ffi
    tile = sparsek_ffi._ffi.extension().sparsek_tile_queries
    sms = jax.devices()[0].core_count
    configs = [(PRESETS[0], k_sel, w) for k_sel, w in [(64, 128), (256, 128), (1024, 128), (256, 256),
                                                       (256, 512), (64, 512), (1024, 512)]]
    configs.append((PRESETS[1], PRESETS[1][6], PRESETS[1][7]))
    print(f"{'preset':16s} {'k':>5s} {'w':>4s} {'sel ms':>7s} {'fwd ms':>7s} {'attn ms':>7s} "
          f"{'CTAs':>6s} {'win/CTA':>7s} {'list/CTA':>8s} {'us/chunk/SM':>11s} {'us/CTA/SM':>9s}")
    made_for = None
    for (name, B, S, N, D, dtype, _, _), k_sel, w in configs:
        if made_for != name:  # the configs of one preset share its inputs
            q, k, v, scores = inputs(B, S, S, N, N, D, jnp.dtype(dtype))
            made_for = name
        ours = jax.jit(lambda q, k, v, s: sparsek_attention(q, k, v, s, k_select=k_sel, window=w))
        sel = jax.jit(lambda s: sparsek_ffi._select_call_cuda(s, S, k_sel, w, True))
        sel_ms, fwd_ms = median_ms(sel, scores), median_ms(ours, q, k, v, scores)
        counts = np.asarray(sel(scores)[3]).astype(np.int64)  # [B, K, tiles]
        tiles = counts.shape[-1]
        # Window chunks of tile t: keys [max(0, r0 - w + 1), min(S, r0 + tile) - 1] (causal).
        r0 = np.arange(tiles) * tile
        lo, hi = np.maximum(0, r0 - (w - 1)), np.minimum(S, r0 + tile) - 1
        win = (hi - lo) // 128 + 1
        listed = -(-counts // 128)
        ctas = B * N * tiles
        attn_ms = fwd_ms - sel_ms
        chunks = N * B * win.sum() + (listed.sum() * (N // counts.shape[1]))
        print(f"{name:16s} {k_sel:5d} {w:4d} {sel_ms:7.3f} {fwd_ms:7.3f} {attn_ms:7.3f} {ctas:6d} "
              f"{win.mean():7.2f} {listed.mean():8.2f} {attn_ms * 1e3 * sms / chunks:11.2f} "
              f"{attn_ms * 1e3 * sms / ctas:9.2f}", flush=True)


if __name__ == "__main__":
    {"sanitize": sanitize, "sanitize-body": sanitize_body, "time": time_presets,
     "chunks": chunk_costs}[sys.argv[1]]()
