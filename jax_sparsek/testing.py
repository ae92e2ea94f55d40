"""Shared by the tests and the benchmarks: the argument specs (one description of an
attention problem, the random inputs it stands for, the named benchmark presets) and the
comparison helpers the tests use."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention problem: shapes, dtype and mask (see SPEC.md for the semantics)."""

    B: int
    T: int
    N: int
    D: int
    S: Optional[int] = None  # defaults to T
    K: Optional[int] = None  # kv heads, defaults to N
    Dv: Optional[int] = None  # defaults to D
    dtype: str = "float32"
    causal: bool = False
    window: Optional[tuple[int, int]] = None  # flash_attention's (left, right)
    block_size: Optional[tuple[int, int]] = None  # block_sparse_attention
    block_density: Optional[float] = None  # fraction of blocks that are on
    k_select: Optional[int] = None  # sparsek_attention
    sparsek_window: Optional[int] = None

    @property
    def s(self) -> int:
        return self.T if self.S is None else self.S

    @property
    def k(self) -> int:
        return self.N if self.K is None else self.K

    @property
    def dv(self) -> int:
        return self.D if self.Dv is None else self.Dv

    @property
    def op(self) -> str:
        if self.k_select is not None:
            return "sparsek_attention"
        if self.block_size is not None:
            return "block_sparse_attention"
        return "flash_attention"

    def replace(self, **kw) -> "AttentionSpec":
        return dataclasses.replace(self, **kw)

    def make_inputs(self, seed: int = 0) -> dict:
        """Fresh random normal q, k, v (and block_mask / scores where the op takes them)."""
        keys = jax.random.split(jax.random.key(seed), 5)
        dt = jnp.dtype(self.dtype)
        out = {
            "q": jax.random.normal(keys[0], (self.B, self.T, self.N, self.D), jnp.float32).astype(dt),
            "k": jax.random.normal(keys[1], (self.B, self.s, self.k, self.D), jnp.float32).astype(dt),
            "v": jax.random.normal(keys[2], (self.B, self.s, self.k, self.dv), jnp.float32).astype(dt),
        }
        if self.block_size is not None:
            bq, bk = self.block_size
            shape = (self.B, self.N, math.ceil(self.T / bq), math.ceil(self.s / bk))
            density = 0.5 if self.block_density is None else self.block_density
            out["block_mask"] = jax.random.uniform(keys[3], shape) < density
        if self.k_select is not None:
            # Scores spread over a few units so that the soft top-k has a non-trivial support.
            out["scores"] = 2.0 * jax.random.normal(keys[4], (self.B, self.s, self.k), jnp.float32)
        return out

    def op_kwargs(self) -> dict:
        if self.k_select is not None:
            return {"k_select": self.k_select, "window": self.sparsek_window, "causal": self.causal}
        if self.block_size is not None:
            return {"block_size": self.block_size, "causal": self.causal}
        return {"causal": self.causal, "window": self.window}

    def attended_keys(self) -> float:
        """Average number of keys a query attends (S_eff in BENCHMARKS.md's FLOP count)."""
        S, T = self.s, self.T
        if self.k_select is not None:
            return min(S, self.k_select + (self.sparsek_window or 0))
        if self.block_size is not None:
            dens = 0.5 if self.block_density is None else self.block_density
            return S * dens * (0.5 if self.causal else 1.0)
        pos = np.arange(T) + S - T
        lo = np.zeros(T) if self.window is None or self.window[0] < 0 else np.maximum(0, pos - self.window[0])
        hi = np.full(T, S - 1) if not self.causal else pos
        if self.window is not None and self.window[1] >= 0:
            hi = np.minimum(hi, pos + self.window[1])
        return float(np.mean(np.clip(hi - lo + 1, 0, None)))

    def flops(self, passes: str = "fwd") -> float:
        fwd = 4.0 * self.B * self.N * self.T * self.attended_keys() * (self.D + self.dv) / 2
        return fwd * (3.5 if passes == "fwd+bwd" else 1.0)


# The named benchmark presets of BENCHMARKS.md (names are stable).
PRESETS: dict[str, AttentionSpec] = {
    "seed000": AttentionSpec(B=16, T=512, N=96, D=64, dtype="float16"),
    "seed003": AttentionSpec(B=16, T=4096, N=96, D=128, dtype="float16", causal=True),
    "long32k": AttentionSpec(B=1, T=32768, N=16, D=128, dtype="bfloat16", causal=True),
    "sparsek-seed003": AttentionSpec(B=16, T=4096, N=96, D=128, dtype="float16", causal=True,
                                     k_select=256, sparsek_window=256),
    "sparsek-long32k": AttentionSpec(B=1, T=32768, N=16, D=128, dtype="bfloat16", causal=True,
                                     k_select=1024, sparsek_window=512),
    "blocksparse80": AttentionSpec(B=4, T=16384, N=16, D=128, dtype="bfloat16",
                                   block_size=(128, 128), block_density=0.2),
}


# ---- SparseK test cases ---------------------------------------------------------------
# A case is (B, T, S, N, K, D, [Dv,] k_select, window, causal).


def sparsek_inputs(case, *, dtype=jnp.float32, seed: int = 0, tied_scores: bool = False):
    """(q, k, v, scores) of a SparseK case: standard normal q, k, v in `dtype` and float32
    scores 2 x normal, rounded to halves with `tied_scores` (ties in the top-k and at the
    SparseK breakpoints)."""
    B, T, S, N, K, D = case[:6]
    Dv = case[6] if len(case) == 10 else D
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    q, k, v = (jnp.asarray(normal(*shape), dtype)
               for shape in ((B, T, N, D), (B, S, K, D), (B, S, K, Dv)))
    scores = 2.0 * normal(B, S, K)
    if tied_scores:
        scores = np.round(scores * 2.0) / 2.0
    return q, k, v, jnp.asarray(scores)


def sparsek_options(case) -> dict:
    *_, k_select, window, causal = case
    return dict(k_select=k_select, window=window, causal=causal)


# ---- comparison helpers -------------------------------------------------------------
# Relative-error bounds against a float32 reference, by input dtype.
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(x)), "result holds NaN or inf"
    denom = max(np.linalg.norm(ref), 1e-30)
    return float(np.linalg.norm(x - ref) / denom)


def assert_close(x, ref, dtype, factor: float = 1.0, what: str = "result"):
    tol = TOLERANCE[str(jnp.dtype(dtype))] * factor
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def upcast(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def hlo_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def assert_custom_call(fn, *args, target: str):
    text = hlo_text(fn, *args)
    assert target in text, f"lowered HLO does not call the FFI target {target}"
