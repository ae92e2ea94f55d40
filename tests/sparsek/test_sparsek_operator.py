"""The SparseK operator: projection properties, exact threshold, edge cases, and its VJPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparsek import reference, sparsek, sparsek_threshold


def enable_x64():
    """A context with float64 enabled (jax.enable_x64 in recent jax, experimental before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as context
    return context()


def f_of_t(u, t):
    """f(t) = sum clip(u - t, 0, 1) over the finite entries, in float64."""
    u = np.asarray(u, np.float64)
    u = u[np.isfinite(u)]
    return np.clip(u - t, 0.0, 1.0).sum()


def bisect_tau(u, k, iters=200):
    """The largest root of f(t) = k by bisection on [theta - 1, theta] (float64)."""
    finite = np.sort(np.asarray(u, np.float64)[np.isfinite(u)])
    theta = finite[-k]
    lo, hi = theta - 1.0, theta  # f(lo) >= k > f(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f_of_t(u, mid) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def normal(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("shape,k", [((7,), 1), ((2, 3, 33), 8), ((5, 200), 64)])
def test_projection_properties(shape, k):
    u = normal(0, *shape, scale=2.0)
    m = sparsek(u, k)
    tau = sparsek_threshold(u, k)
    assert m.shape == u.shape and tau.shape == u.shape[:-1]
    np.testing.assert_allclose(np.sum(m, axis=-1), k, rtol=1e-5)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert np.all(np.sum(m > 0, axis=-1) >= k)  # the support may be larger than k
    np.testing.assert_allclose(m, np.clip(u - tau[..., None], 0.0, 1.0), atol=1e-6)
    for row, t in zip(np.reshape(u, (-1, shape[-1])), np.reshape(tau, (-1,))):
        assert abs(float(t) - bisect_tau(row, k)) < 1e-5


def test_package_and_reference_export_the_operator():
    import jax_sparsek
    import jax_sparsek.sparsek  # binds jax_sparsek.sparsek to the subpackage: still callable

    u = normal(8, 3, 9)
    expected = np.asarray(sparsek(u, 2))
    np.testing.assert_array_equal(jax_sparsek.sparsek(u, 2), expected)
    np.testing.assert_array_equal(reference.sparsek(u, 2), expected)
    assert reference.sparsek_threshold is sparsek_threshold


@pytest.mark.parametrize("n,k", [(3, 3), (2, 5), (1, 1)])
def test_at_most_k_entries_gives_all_ones(n, k):
    u = jnp.arange(n, dtype=jnp.float32) - 1.0
    np.testing.assert_array_equal(sparsek(u, k), np.ones(n))
    assert float(sparsek_threshold(u, k)) == -np.inf
    grad = jax.grad(lambda u: jnp.sum(sparsek(u, k) * jnp.arange(n)))(u)
    np.testing.assert_array_equal(grad, np.zeros(n))
    grad_tau = jax.grad(lambda u: sparsek_threshold(u, k))(u)
    np.testing.assert_array_equal(grad_tau, np.zeros(n))


@pytest.mark.parametrize("u,k,expected", [
    ([1.0, 1.0, 1.0, 1.0], 2, [0.5, 0.5, 0.5, 0.5]),     # all tied
    ([3.0, 3.0, 0.0, 0.0], 1, [0.5, 0.5, 0.0, 0.0]),     # tie at the top
    ([5.0, 5.0, 0.0, 1.0], 2, [1.0, 1.0, 0.0, 0.0]),     # f flat at k: a hard top-k
    ([2.0, 2.0, 2.0, 0.0, 0.0], 2, [2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]),
])
def test_ties_and_flat_pieces(u, k, expected):
    m = sparsek(jnp.asarray(u), k)
    np.testing.assert_allclose(m, expected, atol=1e-6)


def test_flat_piece_takes_the_largest_root():
    # f(t) = 2 for t in [1, 4]: tau = 4 = theta - 1.
    assert float(sparsek_threshold(jnp.array([5.0, 5.0, 0.0, 1.0]), 2)) == 4.0


def test_negative_infinity_entries_are_not_candidates():
    u = jnp.array([[0.3, -jnp.inf, 1.2, -0.5, -jnp.inf, 0.9],
                   [-jnp.inf, 2.0, -jnp.inf, -jnp.inf, 1.0, -jnp.inf]])
    m = sparsek(u, 2)
    np.testing.assert_allclose(np.sum(m, axis=-1), 2.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m)[~np.isfinite(np.asarray(u))], 0.0)
    np.testing.assert_array_equal(m[1], [0, 1, 0, 0, 1, 0])  # two finite entries: all ones
    assert abs(float(sparsek_threshold(u, 2)[0]) - bisect_tau(np.asarray(u[0]), 2)) < 1e-6
    g = normal(1, *u.shape)
    grad = jax.grad(lambda u: jnp.sum(sparsek(u, 2) * g))(u)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~np.isfinite(np.asarray(u))], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)


def _vjp_formula(u, k, g):
    m = np.asarray(sparsek(u, k))
    in_m = (m > 0) & (m < 1)
    mean = np.sum(np.where(in_m, g, 0), -1, keepdims=True) / np.maximum(in_m.sum(-1, keepdims=True), 1)
    return np.where(in_m, g - mean, 0.0), in_m


def test_vjp_matches_the_formula():
    u = normal(2, 3, 4, 25, scale=1.5)
    g = normal(3, *u.shape)
    _, vjp = jax.vjp(lambda u: sparsek(u, 6), u)
    expected, in_m = _vjp_formula(u, 6, np.asarray(g))
    np.testing.assert_allclose(vjp(g)[0], expected, atol=1e-6)
    # dtau/du_j = 1_M(j) / |M|, consistent with the mask's VJP.
    g_tau = normal(4, *u.shape[:-1])
    _, vjp_tau = jax.vjp(lambda u: sparsek_threshold(u, 6), u)
    expected_tau = in_m * np.asarray(g_tau)[..., None] / in_m.sum(-1, keepdims=True)
    np.testing.assert_allclose(vjp_tau(g_tau)[0], expected_tau, atol=1e-6)


def test_vjp_matches_central_differences_in_float64():
    with enable_x64():
        rng = np.random.default_rng(5)
        u = jnp.asarray(1.5 * rng.standard_normal((2, 12)), jnp.float64)
        g = jnp.asarray(rng.standard_normal((2, 12)), jnp.float64)
        loss = jax.jit(lambda u: jnp.sum(sparsek(u, 4) * g) + jnp.sum(sparsek_threshold(u, 4) ** 2))
        grad = np.asarray(jax.grad(loss)(u))
        eps = 1e-6
        basis = np.eye(u.size).reshape((u.size,) + u.shape) * eps
        plus = jax.vmap(loss)(u[None] + basis)
        minus = jax.vmap(loss)(u[None] - basis)
        numeric = np.asarray((plus - minus) / (2 * eps)).reshape(u.shape)
        np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_jit_and_vmap():
    u = normal(7, 3, 5, 16)
    expected = sparsek(u, 4)
    np.testing.assert_allclose(jax.jit(sparsek, static_argnums=1)(u, 4), expected, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda r: sparsek(r, 4))(u), expected, atol=1e-6)


@pytest.mark.parametrize("k,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_k_raises_naming_k(k, error):
    with pytest.raises(error, match=r"\bk\b"):
        sparsek(jnp.ones(4), k)
    with pytest.raises(error, match=r"\bk\b"):
        sparsek_threshold(jnp.ones(4), k)


def test_16_bit_scores_are_projected_in_float32():
    u = normal(9, 3, 40)
    m16 = sparsek(u.astype(jnp.bfloat16), 5)
    assert m16.dtype == jnp.bfloat16 and sparsek_threshold(u.astype(jnp.bfloat16), 5).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(m16).astype(np.float32),
                               sparsek(u.astype(jnp.bfloat16).astype(jnp.float32), 5), atol=4e-3)
