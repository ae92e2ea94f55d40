"""Times every implementation of each problem on the same inputs and turns the timings into
BENCHMARKS.md's records."""

from __future__ import annotations

import datetime
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peers, problems, timing
from benchmarks.problems import Target
from jax_sparsek.testing import AttentionSpec

PASSES = ("fwd", "fwd+bwd")
# BENCHMARKS.md's record, in order.
FIELDS = ("preset", "op", "impl", "pass", "B", "T", "S", "N", "K", "D", "dtype", "causal", "window",
          "k_select", "ms", "tflops", "us_per_head", "gbps", "rel_err", "device", "jax", "date",
          "commit")
REPO = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """The fields every record shares: device, jax version, UTC date, commit (from git, or
    $BENCHMARK_COMMIT for a copy of the tree without its .git)."""
    try:
        git = lambda *a: subprocess.run(("git", "-C", str(REPO)) + a, capture_output=True,
                                        text=True, timeout=10)
        commit = git("rev-parse", "--short", "HEAD").stdout.strip() or None
        if commit and git("diff", "--quiet", "HEAD").returncode != 0:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    commit = os.environ.get("BENCHMARK_COMMIT") or commit
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "commit": commit}


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        return x.detach().float().cpu().numpy()
    return np.asarray(jnp.asarray(x, jnp.float32))


def _measure_jax(impl: peers.Impl, arrays: dict, do, passes: str, iters: int):
    args = [arrays[n] for n in impl.args]
    if passes == "fwd":
        f = jax.jit(impl.fn)
        ms, o = timing.median_ms(lambda: f(*args), jax.block_until_ready, iters)
        return ms, {"o": o}
    f = jax.jit(fwd_bwd(impl))
    return timing.median_ms(lambda: f(do, *args), jax.block_until_ready, iters)


def fwd_bwd(impl: peers.Impl) -> Callable:
    """fn(do, *arrays named by impl.args): the gradients of sum(o * do) w.r.t. impl.grad_args
    (one forward and one backward), as a dict by name."""
    diff = [impl.args.index(n) for n in impl.grad_args]

    def fn(do, *args):
        def partial(*d):
            full = list(args)
            for i, x in zip(diff, d):
                full[i] = x
            return impl.fn(*full)

        _, vjp = jax.vjp(partial, *(args[i] for i in diff))
        return dict(zip(impl.grad_args, vjp(do)))

    return fn


def _measure_torch(impl: peers.Impl, arrays: dict, do, passes: str, iters: int):
    import torch

    backward = passes == "fwd+bwd"
    # torch's attentions take [B, heads, T, D]: transposed copies, made once.
    tensors = [peers.to_torch(arrays[n], torch).transpose(1, 2).contiguous().requires_grad_(backward)
               for n in peers.QKV]
    sync = lambda _: torch.cuda.synchronize()
    if backward:
        do_t = peers.to_torch(do, torch).transpose(1, 2).contiguous()
        call = lambda: torch.autograd.grad(impl.fn(*tensors), tensors, do_t)
        ms, grads = timing.median_ms(call, sync, iters)
        out = dict(zip(peers.QKV, grads))
    else:
        with torch.no_grad():
            ms, o = timing.median_ms(lambda: impl.fn(*tensors), sync, iters)
        out = {"o": o}
    return ms, {n: x.transpose(1, 2) for n, x in out.items()}


class _References:
    """Float32 results per (target, pass) on one slice of the problem, computed once."""

    def __init__(self, spec: AttentionSpec, arrays: dict, do, budget: int, log):
        self.slice = problems.reference_slice(spec, budget)
        self.spec, self.budget, self.log, self.cache = spec, budget, log, {}
        self.arrays = problems.slice_arrays(arrays, spec, *self.slice)
        self.do = problems.slice_arrays({"do": do}, spec, *self.slice)["do"]

    def take(self, out: dict) -> dict:
        """Host float32 copies of the outputs' slice, so that the device outputs can be released
        before the reference runs."""
        part = problems.slice_arrays(out, self.spec, *self.slice)
        return {n: _to_numpy(x) for n, x in part.items()}

    def error(self, impl: peers.Impl, passes: str, mine: dict) -> Optional[float]:
        """rel_err of `mine` (take()'s copies) against the reference (the worst gradient for
        fwd+bwd; the output rows the forward reference covers)."""
        backward = passes == "fwd+bwd"
        key = (impl.target, backward)
        if key not in self.cache:
            try:
                grad_args = ("q", "k", "v", "scores")
                self.cache[key] = problems.reference(impl.target, self.arrays,
                                                     self.do if backward else None, grad_args,
                                                     budget=self.budget)
            except Exception as e:
                self.log(f"no reference for {impl.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                self.cache[key] = None
            gc.collect()  # a failed reference's frames (and their device buffers) go now
        if self.cache[key] is None:
            return None
        ref_o, ref_grads = self.cache[key]
        if backward:
            err = max(rel_err(mine[n], ref_grads[n]) for n in mine if n in ref_grads)
        else:  # the forward reference may cover the last queries only
            err = rel_err(mine["o"][:, mine["o"].shape[1] - ref_o.shape[1]:], ref_o)
        if not np.isfinite(err):  # JSON has no NaN: say it here, record null
            self.log(f"{impl.name} {passes}: the result holds NaN or inf")
            return None
        return err


def record(preset: str, target: Target, impl: str, passes: str, ms: float,
           err: Optional[float], env: dict) -> dict:
    """One row of BENCHMARKS.md: shape and mask fields describe what the row computed (a
    dense peer of a sparse preset reports its dense problem), FLOPs and bytes likewise."""
    s = target.spec
    window = s.sparsek_window if s.op == "sparsek_attention" else s.window
    return {
        "preset": preset, "op": s.op, "impl": impl, "pass": passes,
        "B": s.B, "T": s.T, "S": s.s, "N": s.N, "K": s.k, "D": s.D, "dtype": str(jnp.dtype(s.dtype)),
        "causal": s.causal, "window": list(window) if isinstance(window, tuple) else window,
        "k_select": s.k_select,
        "ms": ms, "tflops": s.flops(passes) / (ms * 1e9), "us_per_head": ms * 1e3 / s.N,
        "gbps": problems.bytes_moved(s, passes) / (ms * 1e6), "rel_err": err,
        **env,
    }


def _progress(total: int, desc: str, start: float):
    """A tqdm bar on a terminal; elsewhere (logs) one line per job with the run's elapsed time."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False), tqdm.write
        except ImportError:
            pass

    class Plain:
        n = 0

        def set_postfix_str(self, s):
            self.n += 1
            print(f"  [{self.n}/{total}] {desc} {s} (at {time.perf_counter() - start:.0f} s)",
                  flush=True)

        def update(self, _=1):
            pass

        def close(self):
            pass

    return Plain(), print


def _torch_module():
    """torch, when this process has imported it and initialised CUDA through it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch
    return None


def release(end_of_problem: bool = False) -> None:
    """Hands device memory back between implementations (never inside a timed region): Python's
    cycles (a failed call's frames hold its buffers), then torch's cached blocks, which torch
    keeps apart from JAX's pool otherwise. At the end of a problem also JAX's compiled programs
    and torch.compile's (FlexAttention's kernels are specialised to the shapes and mask of
    each problem; dynamo's cache per function is limited, beyond which flex_attention falls back
    to an unfused implementation that materialises every score)."""
    gc.collect()
    torch = _torch_module()
    if end_of_problem:
        jax.clear_caches()
    if torch is None:
        return
    try:
        if end_of_problem:
            torch._dynamo.reset()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as e:  # a device left broken by a failed peer shows in the next call
        print(f"releasing torch's memory failed: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}")


def run(problem_specs: dict[str, AttentionSpec], passes: Iterable[str] = PASSES, iters: int = 20,
        only: Optional[set[str]] = None, seed: int = 0,
        ref_budget: int = problems.REF_SCORE_BUDGET,
        done: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Times each implementation of each named problem for each pass; returns the records
    (`done`, when given, gets each record as soon as it exists: a run cut short keeps them)."""
    passes = tuple(passes)
    env = environment()
    records, said, start = [], set(), time.perf_counter()
    for name, spec in problem_specs.items():
        arrays = spec.make_inputs(seed)
        do = jax.random.normal(jax.random.key(seed + 1), (spec.B, spec.T, spec.N, spec.dv),
                               jnp.float32).astype(spec.dtype)
        write = print

        def log(msg: str):  # each reason once per run
            if msg not in said:
                said.add(msg)
                write(msg if msg.startswith("skip") else f"{name}: {msg}")

        impls = peers.build(spec, arrays, passes, log, only)
        jobs = [(i, p) for i in impls for p in passes
                if (p == "fwd" and not i.backward_variant) or (p != "fwd" and i.grad_args is not None)]
        bar, write = _progress(len(jobs), name, start)
        refs = _References(spec, arrays, do, ref_budget, log)
        for n, (impl, p) in enumerate(jobs):
            bar.set_postfix_str(f"{impl.name} {p}")
            measure = _measure_torch if impl.torch else _measure_jax
            out = taken = None
            try:
                inputs = impl.prepare(arrays) if impl.prepare else arrays
                ms, out = measure(impl, inputs, do, p, iters)
                taken = refs.take(out)
            except Exception as e:  # record nothing for a peer that fails
                log(f"{impl.name} {p} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            # The outputs (and prepared inputs) go before the reference or the next job runs; a
            # failure (out of memory included) must not leave its buffers to the next ones.
            out = inputs = None
            if taken is None or impl.torch or n + 1 == len(jobs) or jobs[n + 1][0] is not impl:
                release()
            if taken is not None:
                err = refs.error(impl, p, taken)
                rec = record(name, impl.target, impl.name, p, ms, err, env)
                records.append(rec)
                if done is not None:
                    done([rec])
            taken = None
            bar.update()
        bar.close()
        del arrays, do, refs, impls, jobs
        impl = None  # the last one (FlexAttention's holds its block mask)
        release(end_of_problem=True)
    return records
