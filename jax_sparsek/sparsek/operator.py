"""The SparseK operator (SPEC.md section 3): the Euclidean projection of scores `u` onto
{0 <= m <= 1, sum m = k}, over the last axis.

`m = clip(u - tau, 0, 1)` with `tau` the root of f(t) = sum_j clip(u_j - t, 0, 1) = k.
f is continuous, nonincreasing and piecewise linear with breakpoints at every u_j and u_j - 1,
so the root is found exactly in O(n log n): sort the breakpoints, binary-search the last one
where f >= k (each probe an exact O(n) sum), and solve the linear piece after it.
Where f is flat at k the largest root is returned (any root gives the same m).

Entries equal to -inf are not candidates: m = 0 there and they never enter the support.
When at most k entries are finite, every finite entry gets m = 1 and tau = -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_sparsek._validation import check_int


def _threshold_row(u: jax.Array, k: int) -> jax.Array:
    """tau for one row u [n] (float32 or float64); -inf when at most k entries are finite."""
    n = u.shape[0]
    if n <= k:
        return jnp.full((), -jnp.inf, u.dtype)
    a = jnp.sort(u)  # ascending; the -inf entries come first
    finite_count = jnp.sum(a > -jnp.inf)
    # Work relative to theta, the k-th largest entry: tau lies in [theta - 1, theta).
    theta = a[n - k]
    x = a - jnp.where(jnp.isfinite(theta), theta, 0.0).astype(u.dtype)
    valid = x > -jnp.inf

    def f(t):  # exact sum; nonincreasing in t also in floating point
        return jnp.sum(jnp.where(valid, jnp.clip(x - t, 0.0, 1.0), 0.0))

    # Binary search over the sorted breakpoints for the last one with f >= k. The first one
    # is min(x) - 1 (or -inf), where f counts every finite entry (> k); the last is max(x),
    # where f = 0 < k. Equal breakpoints have equal f, so t_lo < t_hi at the end.
    breakpoints = jnp.sort(jnp.concatenate([x, x - 1]))

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        above = f(breakpoints[mid]) >= k
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    steps = int(np.ceil(np.log2(2 * n)))
    lo, hi = jax.lax.fori_loop(0, steps, halve, (jnp.int32(0), jnp.int32(2 * n - 1)))
    t_lo, t_hi = breakpoints[lo], breakpoints[hi]
    # On (t_lo, t_hi) the support M = {t < x < t + 1} is fixed and f has slope -|M|; where
    # M is empty f is flat at k and t_lo is the right end of that flat piece.
    support = jnp.sum(valid & (x >= t_hi) & (x - 1 <= t_lo))
    step = (f(t_lo) - k) / jnp.maximum(support, 1)
    tau_x = jnp.where(support > 0, jnp.clip(t_lo + step, t_lo, t_hi), t_lo)
    tau = tau_x + jnp.where(jnp.isfinite(theta), theta, 0.0)
    return jnp.where(finite_count > k, tau, -jnp.inf).astype(u.dtype)


@functools.partial(jax.jit, static_argnums=1)  # one compiled program, also when called eagerly
def _threshold(u: jax.Array, k: int) -> jax.Array:
    lead = u.shape[:-1]
    # 16-bit scores are projected in float32; tau comes back in u's dtype.
    rows = u.reshape((-1, u.shape[-1])).astype(jnp.promote_types(u.dtype, jnp.float32))
    return jax.vmap(lambda r: _threshold_row(r, k))(rows).reshape(lead).astype(u.dtype)


def _support(u, tau):
    """M = {j : 0 < m_j < 1} = {tau < u_j < tau + 1}; empty where tau = -inf."""
    t = tau[..., None]
    return (u > t) & (u < t + 1)


def _mask_from_tau(u, tau):
    return jnp.where(u > -jnp.inf, jnp.clip(u - tau[..., None], 0.0, 1.0), 0.0).astype(u.dtype)


def _check(u, k):
    k = check_int("k", k, 1)
    if not hasattr(u, "shape") or u.ndim < 1:
        raise ValueError(f"u must be an array with at least one axis, got {type(u).__name__}")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise TypeError(f"u must be a floating-point array, got {jnp.dtype(u.dtype)}")
    return k


# ---- sparsek_threshold --------------------------------------------------------------

def _threshold_fwd(u, k):
    tau = _threshold(u, k)
    return tau, (u, tau)


def _threshold_bwd(k, res, g):
    # dtau/du_j = 1_M(j) / |M| (implicit differentiation of sum_M (u_j - tau) + |A| = k).
    u, tau = res
    in_m = _support(u, tau)
    size = jnp.maximum(jnp.sum(in_m, axis=-1, keepdims=True), 1).astype(u.dtype)
    return (jnp.where(in_m, g[..., None] / size, 0.0).astype(u.dtype),)


_threshold_vjp = jax.custom_vjp(_threshold, nondiff_argnums=(1,))
_threshold_vjp.defvjp(_threshold_fwd, _threshold_bwd)
_threshold_jit = jax.jit(_threshold_vjp, static_argnums=1)


def sparsek_threshold(u: jax.Array, k: int) -> jax.Array:
    """tau with sum_j clip(u_j - tau, 0, 1) = k over the last axis of `u` (shape u.shape[:-1]).

    `k` is a static positive int. Where at most k entries of a row are finite (in particular
    when the last axis has at most k entries) tau is -inf. Entries equal to -inf are not
    candidates. Differentiable: dtau/du_j = 1_M(j) / |M| with M = {j : tau < u_j < tau + 1}.
    """
    u = jnp.asarray(u)
    k = _check(u, k)
    return _threshold_jit(u, k)


# ---- sparsek ------------------------------------------------------------------------

def _sparsek(u, k):
    return _mask_from_tau(u, _threshold(u, k))


def _sparsek_fwd(u, k):
    tau = _threshold(u, k)
    return _mask_from_tau(u, tau), (u, tau)


def _sparsek_bwd(k, res, g):
    # du = 1_M * (g - mean_M g), zero outside M (SPEC.md section 3).
    u, tau = res
    in_m = _support(u, tau)
    size = jnp.maximum(jnp.sum(in_m, axis=-1, keepdims=True), 1).astype(u.dtype)
    mean = jnp.sum(jnp.where(in_m, g, 0.0), axis=-1, keepdims=True) / size
    return (jnp.where(in_m, g - mean, 0.0).astype(u.dtype),)


_sparsek_vjp = jax.custom_vjp(_sparsek, nondiff_argnums=(1,))
_sparsek_vjp.defvjp(_sparsek_fwd, _sparsek_bwd)
_sparsek_jit = jax.jit(_sparsek_vjp, static_argnums=1)


def sparsek(u: jax.Array, k: int) -> jax.Array:
    """The SparseK soft top-k mask m = clip(u - tau, 0, 1), sum(m) = k, over the last axis.

    `k` is a static positive int. Rows with at most k finite entries give m = 1 on every
    finite entry; entries equal to -inf always get m = 0. The support of m can be larger
    than k. VJP: du = 1_M * (g - mean_M g) with M = {j : 0 < m_j < 1}.
    """
    u = jnp.asarray(u)
    k = _check(u, k)
    return _sparsek_jit(u, k)
