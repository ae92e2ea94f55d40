"""Correctness checks, sanitizer runs and timings of the CUDA attention kernels, in one call.

Self-contained: calls the FFI targets through jax.ffi.ffi_call (importing jax_sparsek registers
them), so it needs no Python wrapper. Run on an H100 from the repository root after building
(`tools/dev_build.sh -DJAX_SPARSEK_CUDA=ON`):

    PYTHONPATH=. python3 cpp/flash_attention/cuda/check_and_time.py all

`all` runs each stage in a subprocess with a time limit (a hung kernel costs its stage, not
the run): `check [STAGE,...]` (fresh random inputs, float64 reference, outputs poisoned
beforehand, every forward and backward kernel variant; the deterministic backward also run
twice for the same bits), `sanitize` (compute-sanitizer memcheck + racecheck on small
shapes), `time` (median times next to jax.nn.dot_product_attention's cuDNN kernel; the table
comes last).
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
FWD_KERNELS = ("mma", "wgmma_nopingpong", "wgmma")
BWD_KERNELS = ("mma", "wgmma")


def _jax():
    import jax
    import jax.numpy as jnp

    import jax_sparsek  # noqa: F401  (registers the FFI targets)

    return jax, jnp


# ----------------------------------------------------------------------------- FFI calls
def ffi_fwd(q, k, v, *, scale, causal, window=(-1, -1), block_mask=None, block=None):
    jax, jnp = _jax()
    B, T, N, D = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
    if block_mask is None:
        return jax.ffi.ffi_call("jax_sparsek_flash_fwd", out)(
            q, k, v, scale=np.float32(scale), causal=np.bool_(causal),
            window_left=np.int64(window[0]), window_right=np.int64(window[1]))
    return jax.ffi.ffi_call("jax_sparsek_block_sparse_fwd", out)(
        q, k, v, block_mask, scale=np.float32(scale), causal=np.bool_(causal),
        block_q=np.int64(block[0]), block_k=np.int64(block[1]))


def ffi_bwd(q, k, v, o, lse, do, *, scale, causal, window=(-1, -1), block_mask=None, block=None,
            deterministic=False):
    jax, jnp = _jax()
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
           jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(q.shape, jnp.float32))
    if block_mask is None:
        res = jax.ffi.ffi_call("jax_sparsek_flash_bwd", out)(
            q, k, v, o, lse, do, scale=np.float32(scale), causal=np.bool_(causal),
            window_left=np.int64(window[0]), window_right=np.int64(window[1]),
            deterministic=deterministic)
    else:
        res = jax.ffi.ffi_call("jax_sparsek_block_sparse_bwd", out)(
            q, k, v, block_mask, o, lse, do, scale=np.float32(scale), causal=np.bool_(causal),
            block_q=np.int64(block[0]), block_k=np.int64(block[1]), deterministic=deterministic)
    return res[:3]


# ------------------------------------------------------------------------------ reference
def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))


def poison(*shapes_dtypes):
    """Fills freshly allocated device buffers of the outputs' sizes with NaN and frees them,
    so an output element a kernel forgets to write shows up as NaN or garbage."""
    jax, jnp = _jax()
    bufs = [jnp.full(s, jnp.nan, d) for s, d in shapes_dtypes]
    for b in bufs:
        b.block_until_ready()
    del bufs


# ------------------------------------------------------------------------------- checks
CASES = [
    # name, B, T, S, N, K, kwargs
    ("dense", 2, 300, 300, 4, 2, dict(causal=False)),
    ("causal", 2, 300, 300, 4, 2, dict(causal=True)),
    ("causal T<S", 1, 200, 457, 4, 4, dict(causal=True)),
    ("causal T>S", 1, 300, 200, 2, 1, dict(causal=True)),
    ("window(100,20)", 1, 384, 384, 4, 2, dict(causal=False, window=(100, 20))),
    ("causal window(64,0)", 1, 333, 400, 4, 4, dict(causal=True, window=(64, 0))),
    ("window(0,5) T<S", 1, 130, 260, 2, 2, dict(causal=False, window=(0, 5))),
    ("block 128x128 mask[K]", 2, 512, 640, 4, 2, dict(causal=False, block=(128, 128), mask_heads="K")),
    ("block 64x96 causal mask[N]", 1, 400, 500, 4, 2, dict(causal=True, block=(64, 96), mask_heads="N",
                                                          density=0.3)),
    ("block 200x50 mask[1,1]", 2, 300, 333, 2, 1, dict(causal=False, block=(200, 50), mask_heads="1", mask_batch=1)),
]
BOUND = {"bfloat16": 1e-2, "float16": 4e-3}


def make_case(case, dtype, D, seed):
    jax, jnp = _jax()
    name, B, T, S, N, K, kw = case
    kw = dict(kw)
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, N, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (B, T, N, D), jnp.float32).astype(dtype)
    args = dict(scale=1.0 / math.sqrt(D), causal=kw["causal"])
    if "window" in kw:
        args["window"] = kw["window"]
    if "block" in kw:
        bq, bk = kw["block"]
        hm = {"N": N, "K": K, "1": 1}[kw["mask_heads"]]
        bm = jax.random.uniform(keys[4], (kw.get("mask_batch", B), hm, -(-T // bq), -(-S // bk))) < kw.get("density", 0.55)
        args["block_mask"] = bm
        args["block"] = (bq, bk)
    return (q, k, v, do), args


def np_visibility(T, S, N, K, *, causal, window=(-1, -1), block_mask=None, block=None):
    i = np.arange(T)[:, None] + S - T
    j = np.arange(S)[None, :]
    vis = np.ones((T, S), bool)
    if causal:
        vis &= j <= i
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    vis = vis[None, None]
    if block_mask is not None:
        bq, bk = block
        bm = np.asarray(block_mask)
        if bm.shape[1] == K and K != N:
            bm = np.repeat(bm, N // K, axis=1)
        bm = bm[:, :, np.arange(T) // bq][:, :, :, np.arange(S) // bk]
        vis = vis & bm
    return vis


def np_reference(q, k, v, vis, scale, do):
    """float64 attention and its gradients: o, lse [B,N,T], dq, dk, dv (GQA heads folded)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k, optimize=True) * scale
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    pn = p / np.where(l > 0, l, 1.0)
    o = np.einsum("bnts,bsnd->btnd", pn, v, optimize=True)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0], -np.inf)
    dv = np.einsum("bnts,btnd->bsnd", pn, do, optimize=True)
    dp = np.einsum("btnd,bsnd->bnts", do, v, optimize=True)
    ds = pn * (dp - (dp * pn).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnd->btnd", ds, k, optimize=True) * scale
    dk = np.einsum("bnts,btnd->bsnd", ds, q, optimize=True) * scale
    dk = dk.reshape(B, S, K, G, D).sum(3)
    dv = dv.reshape(B, S, K, G, D).sum(3)
    return o, lse, dq, dk, dv


_CACHE: dict = {}


def case_data(dtype, D, ci, seed, grads=False):
    """Inputs, FFI arguments and the float64 NumPy reference of one test case; computed once per
    (dtype, D, case) and shared by every kernel variant."""
    key = (dtype, D, ci)
    if key not in _CACHE:
        (q, k, v, do), args = make_case(CASES[ci], dtype, D, seed)
        vis = np_visibility(q.shape[1], k.shape[1], q.shape[2], k.shape[2], causal=args["causal"],
                            window=args.get("window", (-1, -1)), block_mask=args.get("block_mask"),
                            block=args.get("block"))
        np32 = lambda x: np.asarray(x.astype("float32"))
        o, lse, dq, dk, dv = np_reference(np32(q), np32(k), np32(v), vis, args["scale"], np32(do))
        _CACHE[key] = dict(inputs=(q, k, v, do), args=args, fwd=(o, lse), grads=(dq, dk, dv))
    return _CACHE[key]


def check_forward(kernel, dtype, D, ci, seed):
    jax, jnp = _jax()
    os.environ["JAX_SPARSEK_CUDA_FWD_KERNEL"] = kernel
    c = case_data(dtype, D, ci, seed)
    (q, k, v, _), args = c["inputs"], c["args"]
    o_ref, lse_ref = c["fwd"]
    B, T, N, _ = q.shape
    poison((q.shape, q.dtype), ((B, N, T), jnp.float32))
    fn = jax.jit(lambda q, k, v: ffi_fwd(q, k, v, **args))  # a fresh executable per kernel variant
    o, lse = jax.block_until_ready(fn(q, k, v))
    o, lse = np.asarray(o.astype(jnp.float32)), np.asarray(lse)
    err = rel_err(o, o_ref)
    empty = np.isneginf(lse_ref)
    ok_inf = np.array_equal(np.isneginf(lse), empty)
    lse_err = float(np.max(np.abs(lse[~empty] - lse_ref[~empty]))) if (~empty).any() else 0.0
    zero_rows = bool(np.all(o.transpose(0, 2, 1, 3)[empty] == 0)) if empty.any() else True
    ok = err < BOUND[dtype] and ok_inf and lse_err < 2e-2 and zero_rows and np.isfinite(lse[~empty]).all()
    return ok, f"o {err:.2e} lse {lse_err:.1e} empty-rows {int(empty.sum())} {'ok' if ok_inf and zero_rows else 'BAD'}"


def check_backward(kernel, dtype, D, ci, seed, deterministic=False):
    jax, jnp = _jax()
    os.environ["JAX_SPARSEK_CUDA_BWD_KERNEL"] = kernel
    c = case_data(dtype, D, ci, seed)
    (q, k, v, do), args = c["inputs"], c["args"]
    args = dict(args, deterministic=deterministic)
    o_ref, lse_ref = c["fwd"]
    poison((q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype), (q.shape, jnp.float32))
    fn = jax.jit(lambda q, k, v, o, lse, do: ffi_bwd(q, k, v, o, lse, do, **args))
    o_in = jnp.asarray(o_ref.astype(np.float32)).astype(q.dtype)
    lse_in = jnp.asarray(lse_ref.astype(np.float32))
    dq, dk, dv = jax.block_until_ready(fn(q, k, v, o_in, lse_in, do))
    errs = [rel_err(np.asarray(x.astype(jnp.float32)), r) for x, r in zip((dq, dk, dv), c["grads"])]
    bound = 2 * BOUND[dtype]
    ok, note = all(e < bound for e in errs), "dq {:.2e} dk {:.2e} dv {:.2e}".format(*errs)
    if deterministic:  # a second run, on poisoned memory again, gives the same bits
        poison((q.shape, jnp.float32))
        dq_again = jax.block_until_ready(fn(q, k, v, o_in, lse_in, do))[0]
        same = np.array_equal(np.asarray(dq).view(np.uint16), np.asarray(dq_again).view(np.uint16))
        ok, note = ok and same, note + (" bitwise-repeat ok" if same else " bitwise-repeat DIFFERS")
    return ok, note


def stage_check(only=None):
    jax, jnp = _jax()
    print("device:", jax.devices()[0].device_kind, flush=True)
    seed = int(time.time()) % 100000
    print("seed", seed, flush=True)
    results = {}
    # Errors reported as InvalidArgument rather than crashes.
    q32 = jnp.ones((1, 8, 2, 64), jnp.float32)
    for what, args in (("float32", (q32, q32, q32)),
                       ("D=96", tuple(jnp.ones((1, 8, 2, 96), jnp.float16) for _ in range(3)))):
        try:
            jax.block_until_ready(ffi_fwd(*args, scale=0.1, causal=False))
            print(f"REJECT {what}: NOT rejected", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0][:160]
            print(f"REJECT {what}: {msg}", flush=True)
    # The default kernels (wgmma) see every case with both dtypes; the alternatives and the
    # deterministic backward one dtype each.
    dtypes = {"wgmma": ("bfloat16", "float16"), "bwd_wgmma": ("bfloat16", "float16"),
              "wgmma_nopingpong": ("float16",), "mma": ("bfloat16",), "bwd_mma": ("float16",),
              "bwd_wgmma_deterministic": ("float16",), "bwd_mma_deterministic": ("bfloat16",)}
    for stage in only or dtypes:
        n_ok = n_all = 0
        for dtype in dtypes[stage]:
            for D in (64, 128):
                for ci, case in enumerate(CASES):
                    seed += 1
                    try:
                        if stage.startswith("bwd"):
                            ok, msg = check_backward(stage.split("_")[1], dtype, D, ci, seed,
                                                     stage.endswith("deterministic"))
                        else:
                            ok, msg = check_forward(stage, dtype, D, ci, seed)
                    except Exception as e:  # noqa: BLE001
                        ok, msg = False, "EXC " + str(e).splitlines()[0][:200]
                    n_ok += ok
                    n_all += 1
                    print(f"  {stage:17s} {dtype:8s} D{D:<3d} {case[0]:28s} {'PASS' if ok else 'FAIL'} {msg}",
                          flush=True)
        results[stage] = (n_ok, n_all)
        print(f"RESULT {stage} {n_ok}/{n_all}", flush=True)


def stage_sanitize_body():
    """Small calls of every kernel, run under compute-sanitizer by stage_sanitize."""
    jax, jnp = _jax()
    for kernel in FWD_KERNELS:
        os.environ["JAX_SPARSEK_CUDA_FWD_KERNEL"] = kernel
        for ci in (1, 8):
            (q, k, v, do), args = make_case(CASES[ci], "float16", 128, 1)
            o, lse = jax.block_until_ready(jax.jit(lambda q, k, v: ffi_fwd(q, k, v, **args))(q, k, v))
            if kernel == "wgmma":
                for bwd_kernel in BWD_KERNELS:
                    os.environ["JAX_SPARSEK_CUDA_BWD_KERNEL"] = bwd_kernel
                    for deterministic in (False, True):
                        jax.block_until_ready(jax.jit(
                            lambda *a: ffi_bwd(*a, **args, deterministic=deterministic))(q, k, v, o, lse, do))
    print("sanitize body done", flush=True)


def stage_sanitize():
    env = dict(os.environ, XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    for tool in ("memcheck", "racecheck"):
        if tool == "racecheck" and os.environ.get("RACECHECK") != "1":
            continue
        cmd = ["compute-sanitizer", f"--tool={tool}", "--kernel-name", "kns=jax_sparsek",
               "--print-limit", "10", sys.executable, HERE, "sanitize-body"]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=int(os.environ.get("SANITIZE_TIMEOUT", "120")))
            out = r.stdout + r.stderr
            summary = [l for l in out.splitlines() if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l
                       or "Invalid" in l or "Race" in l or "hazard" in l.lower()][:12]
            print(f"SANITIZE {tool} rc={r.returncode} {time.time() - t0:.0f}s", flush=True)
            for l in summary:
                print("   ", l[:200], flush=True)
        except subprocess.TimeoutExpired:
            print(f"SANITIZE {tool} TIMEOUT", flush=True)


# ------------------------------------------------------------------------------ timings
def bench(fn, *args, reps=20):
    """Median ms per call over `reps` timed groups of back-to-back calls (async dispatch keeps the
    GPU busy; groups of 5 for calls under 2 ms so that dispatch gaps do not count)."""
    jax, _ = _jax()
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        est = time.perf_counter() - t0
    inner = 5 if est < 2e-3 else 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times)) * 1e3  # ms


def stage_time(kernels):
    jax, jnp = _jax()
    dev = jax.devices()[0].device_kind
    rows = []

    def add(config, impl, ms, flops=None, heads=None):
        tf = f"{flops / ms / 1e9:.0f}" if flops else ""
        us_head = f"{ms * 1e3 / heads:.2f}" if heads else ""
        rows.append((config, impl, f"{ms:.3f}", tf, us_head))
        print(f"  {config:34s} {impl:28s} {ms:9.3f} ms {tf:>5s} TF/s {us_head:>7s} us/head", flush=True)

    configs = [
        ("B16 H96 S512 D64 fp16", 16, 512, 96, 64, "float16", dict(causal=False), True),
        ("B16 H96 S4096 D128 fp16 causal", 16, 4096, 96, 128, "float16", dict(causal=True), True),
        ("B1 H16 S32768 D128 bf16 causal", 1, 32768, 16, 128, "bfloat16", dict(causal=True), True),
        ("B16 H96 S4096 D128 fp16 win256", 16, 4096, 96, 128, "float16", dict(causal=True, window=(255, 0)), False),
        ("B4 H16 S16384 D128 bf16 dense", 4, 16384, 16, 128, "bfloat16", dict(causal=False), False),
        ("B4 H16 S16384 D128 bf16 bs20%", 4, 16384, 16, 128, "bfloat16", dict(causal=False, block=(128, 128)), True),
    ]
    for name, B, S, H, D, dtype, kw, with_bwd in configs:
        keys = jax.random.split(jax.random.key(0), 5)
        q, k, v, do = (jax.random.normal(keys[i], (B, S, H, D), dtype) for i in range(4))
        args = dict(scale=1.0 / math.sqrt(D), causal=kw["causal"])
        if "window" in kw:
            args["window"] = kw["window"]
            keys_per_q = kw["window"][0] + 1
        else:
            keys_per_q = S / 2 if kw["causal"] else S
        if "block" in kw:
            args["block"] = kw["block"]
            args["block_mask"] = jax.random.uniform(keys[4], (B, H, S // 128, S // 128)) < 0.2
            keys_per_q = S * float(jnp.mean(args["block_mask"]))
        flops = 4.0 * B * H * S * keys_per_q * D
        for kernel in kernels:
            os.environ["JAX_SPARSEK_CUDA_FWD_KERNEL"] = kernel
            fwd = jax.jit(lambda q, k, v: ffi_fwd(q, k, v, **args))
            try:
                add(name, f"jax-sparsek fwd {kernel}", bench(fwd, q, k, v), flops, H)
            except Exception as e:  # noqa: BLE001
                print("   fwd", kernel, "failed:", str(e)[:200], flush=True)
        if with_bwd:
            o, lse = fwd(q, k, v)
            bwd = jax.jit(lambda *a: ffi_bwd(*a, **args))
            bwd_det = jax.jit(lambda *a: ffi_bwd(*a, **args, deterministic=True))
            for bwd_kernel in BWD_KERNELS:
                os.environ["JAX_SPARSEK_CUDA_BWD_KERNEL"] = bwd_kernel
                try:
                    add(name, f"jax-sparsek bwd {bwd_kernel}", bench(bwd, q, k, v, o, lse, do),
                        2.5 * flops, H)
                    add(name, f"jax-sparsek bwd {bwd_kernel} deterministic",
                        bench(bwd_det, q, k, v, o, lse, do), 2.5 * flops, H)
                except Exception as e:  # noqa: BLE001
                    print("   bwd", bwd_kernel, "failed:", str(e)[:200], flush=True)
            del o, lse
        if "block" not in kw and "dense" not in name:
            cud_kw = dict(is_causal=kw["causal"], implementation="cudnn")
            if "window" in kw:
                cud_kw["local_window_size"] = kw["window"]
            cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **cud_kw))
            try:
                add(name, "jax.nn cudnn fwd", bench(cud, q, k, v), flops, H)
                if with_bwd:
                    loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, **cud_kw).astype(jnp.float32)
                                                   * do.astype(jnp.float32))
                    cud_fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                    add(name, "jax.nn cudnn fwd+bwd", bench(cud_fb, q, k, v), 3.5 * flops, H)
            except Exception as e:  # noqa: BLE001
                print("   cudnn failed:", str(e)[:200], flush=True)
        del q, k, v, do
    print(f"\nTIMINGS on {dev} (median ms; TF/s count only visible keys; causal = half)", flush=True)
    print(f"| config | implementation | ms | TF/s | us/head |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# --------------------------------------------------------------------------------- main
def run_stage(args, timeout):
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, HERE] + args, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + (r.stderr[-3000:] if r.returncode else "")
        print(out, flush=True)
        print(f"[stage {args[0]} rc={r.returncode} {time.time() - t0:.0f}s]", flush=True)
        return out
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out, flush=True)
        print(f"[stage {args[0]} TIMEOUT after {timeout}s]", flush=True)
        return out


def main():
    stage = sys.argv[1] if len(sys.argv) > 1 else "all"
    if stage == "check":
        stage_check(sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    elif stage == "sanitize":
        stage_sanitize()
    elif stage == "sanitize-body":
        stage_sanitize_body()
    elif stage == "time":
        stage_time(sys.argv[2].split(",") if len(sys.argv) > 2 else list(FWD_KERNELS))
    elif stage == "all":
        out = run_stage(["check"], timeout=int(os.environ.get("CHECK_TIMEOUT", "240")))
        passing = [k for k in FWD_KERNELS
                   if re.search(rf"RESULT {k} (\d+)/(\d+)", out)
                   and len(set(re.search(rf"RESULT {k} (\d+)/(\d+)", out).groups())) == 1]
        print("forward kernels that passed every check:", passing or "none", flush=True)
        if os.environ.get("SKIP_SANITIZE") != "1":
            run_stage(["sanitize"], timeout=2 * int(os.environ.get("SANITIZE_TIMEOUT", "120")) + 10)
        run_stage(["time", ",".join(passing or ["mma"])], timeout=int(os.environ.get("TIME_TIMEOUT", "300")))
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    main()
