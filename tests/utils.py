"""Helpers every test module shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
