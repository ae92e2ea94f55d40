"""SparseK attention: the FFI kernels against the pure-JAX reference (forward, selection and the
gradients of all four inputs), the reference against float64 central differences, transforms,
lowering and argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparsek import reference, sparsek_attention
from jax_sparsek.sparsek import ffi as sparsek_ffi
from jax_sparsek.sparsek import reference as sparsek_reference
from jax_sparsek.testing import (assert_close, assert_custom_call, rel_err, sparsek_inputs,
                                 sparsek_options)

# (B, T, S, N, K, D, Dv, k_select, window, causal)
CONFIGS = {
    "square-gqa2": (2, 16, 16, 4, 2, 8, 8, 3, 2, True),
    "decode-gqa4": (1, 1, 24, 4, 1, 8, 8, 4, 3, True),
    "more-queries-than-keys": (1, 20, 12, 2, 2, 8, 8, 2, 1, True),
    "window0-prefill": (1, 10, 24, 4, 1, 8, 8, 4, 0, True),
    "k-covers-prefix": (1, 16, 16, 2, 2, 8, 8, 40, 4, True),
    "window-covers-all": (1, 16, 16, 2, 1, 8, 8, 3, 100, True),
    "longer-gqa2": (1, 48, 48, 4, 2, 8, 8, 8, 4, True),
    "noncausal": (2, 16, 16, 4, 4, 8, 8, 5, 2, False),
    "noncausal-dv": (1, 12, 20, 4, 2, 16, 8, 6, 3, False),
}


def np32(x):
    """A float32 NumPy copy (converted on the host: no device program per shape and dtype)."""
    return np.asarray(x).astype(np.float32)


@functools.lru_cache(maxsize=None)
def value_and_grads(config, implementation):
    """jit(o, (dq, dk, dv, dscores)) for a fixed random cotangent of o."""
    opts = sparsek_options(config)

    def run(q, k, v, scores, do):
        fn = lambda q, k, v, s: sparsek_attention(q, k, v, s, implementation=implementation, **opts)
        o, vjp = jax.vjp(fn, q, k, v, scores)
        return o, vjp(do.astype(o.dtype))

    return jax.jit(run)


def cotangent(config):
    B, T, _, N, _, _, Dv, *_ = config
    return jnp.asarray(np.random.default_rng(99).standard_normal((B, T, N, Dv), dtype=np.float32))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ffi_matches_reference(name):
    config = CONFIGS[name]
    do = cotangent(config)
    reference_fn = value_and_grads(config, "xla")
    for dtype, tied in ((jnp.float32, False), (jnp.float32, True), (jnp.bfloat16, False),
                        (jnp.float16, False)):
        q, k, v, scores = sparsek_inputs(config, seed=1, dtype=dtype, tied_scores=tied)
        o, grads = value_and_grads(config, "ffi")(q, k, v, scores, do)
        # The reference sees the same (rounded) inputs in float32.
        up = [jnp.asarray(np32(x)) for x in (q, k, v)]
        o_ref, grads_ref = reference_fn(*up, scores, do)
        assert o.dtype == dtype and o.shape == o_ref.shape
        what = f"{name} {jnp.dtype(dtype).name}{' tied' if tied else ''}"
        assert_close(np32(o), o_ref, dtype, what=f"{what} o")
        for label, g, g_ref in zip(("dq", "dk", "dv", "dscores"), grads, grads_ref):
            assert g.shape == g_ref.shape
            expected_dtype = jnp.float32 if label == "dscores" else dtype
            assert g.dtype == expected_dtype, label
            if float(jnp.linalg.norm(g_ref)) == 0.0:  # e.g. no soft gate anywhere
                np.testing.assert_array_equal(g, 0.0, err_msg=f"{what} {label}")
            else:
                assert_close(np32(g), g_ref, dtype, factor=4.0, what=f"{what} {label}")


@pytest.mark.parametrize("name", ["square-gqa2", "more-queries-than-keys", "window0-prefill",
                                  "k-covers-prefix", "noncausal"])
@pytest.mark.parametrize("tied", [False, True])
def test_selection_matches_reference(name, tied):
    config = CONFIGS[name]
    T, opts = config[1], sparsek_options(config)
    _, _, _, scores = sparsek_inputs(config, seed=2, tied_scores=tied)
    tau, kth = sparsek_ffi.select(scores, num_queries=T, **opts)
    tau_ref, kth_ref, *_ = sparsek_reference.selection(scores, T, **opts)
    tau_ref = np.broadcast_to(tau_ref, tau.shape)
    np.testing.assert_array_equal(kth, np.broadcast_to(kth_ref, kth.shape))
    np.testing.assert_array_equal(np.isfinite(tau), np.isfinite(tau_ref))
    finite = np.isfinite(tau_ref)
    np.testing.assert_allclose(np.asarray(tau)[finite], tau_ref[finite], atol=2e-6)
    tau = np.asarray(tau)
    assert np.all(tau[..., 1:] >= tau[..., :-1])  # nondecreasing along the queries


def enable_x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as context
    return context()


@pytest.mark.parametrize("config", [(1, 6, 6, 2, 1, 4, 4, 2, 1, True),
                                    (1, 5, 7, 2, 2, 4, 3, 3, 1, False)], ids=["causal", "noncausal"])
def test_gradients_match_float64_central_differences(config):
    """FFI and reference gradients of all four inputs against central differences of the
    reference evaluated in float64."""
    B, T, S, N, K, D, Dv, k_select, window, causal = config
    q, k, v, scores = sparsek_inputs(config, seed=3)
    do = cotangent(config)
    o, grads = value_and_grads(config, "ffi")(q, k, v, scores, do)
    _, grads_ref = value_and_grads(config, "xla")(q, k, v, scores, do)
    sizes = [x.size for x in (q, k, v, scores)]
    with enable_x64():
        f64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, scores, do)]
        dense = functools.partial(sparsek_reference.sparsek_attention_dense, k_select=k_select,
                                  window=window, causal=causal, scale=D ** -0.5)

        def loss(flat):
            parts = jnp.split(flat, np.cumsum(sizes)[:-1])
            args = [p.reshape(x.shape) for p, x in zip(parts, f64)]
            return jnp.sum(dense(*args) * f64[4])

        flat = jnp.concatenate([x.ravel() for x in f64[:4]])
        eps = 1e-6
        basis = jnp.eye(flat.size, dtype=jnp.float64) * eps
        numeric = jax.jit(jax.vmap(lambda e: (loss(flat + e) - loss(flat - e)) / (2 * eps)))(basis)
        numeric = np.asarray(numeric)
        grad64 = np.asarray(jax.jit(jax.grad(loss))(flat))
    np.testing.assert_allclose(grad64, numeric, atol=1e-6, rtol=1e-5)  # the reference's autodiff
    numeric_parts = np.split(numeric, np.cumsum(sizes)[:-1])
    for label, g, g_ref, num in zip(("dq", "dk", "dv", "dscores"), grads, grads_ref, numeric_parts):
        assert np.abs(num).max() > 0, label  # every input's gradient is exercised
        assert rel_err(g, num.reshape(g.shape)) < 1e-5, label
        assert rel_err(g_ref, num.reshape(g.shape)) < 1e-5, label


def test_zero_rows_have_zero_output_and_finite_gradients():
    # T > S: queries 0..3 sit before the first key; window 0, k_select 1: query 4 sees key 0.
    config = (1, 8, 4, 2, 1, 4, 4, 1, 0, True)
    q, k, v, scores = sparsek_inputs(config, seed=4)
    do = cotangent(config)
    for implementation in ("ffi", "xla"):
        o, grads = value_and_grads(config, implementation)(q, k, v, scores, do)
        np.testing.assert_array_equal(o[:, :4], 0.0)
        assert np.all(np.abs(np.asarray(o[:, 4:])) > 0)
        np.testing.assert_array_equal(grads[0][:, :4], 0.0)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_window_only_rows_equal_local_attention():
    # No candidate anywhere (window >= S): plain causal attention over the window.
    config = CONFIGS["window-covers-all"]
    q, k, v, scores = sparsek_inputs(config, seed=5)
    o = sparsek_attention(q, k, v, scores, implementation="ffi", **sparsek_options(config))
    kk = jnp.repeat(k, 2, axis=2)
    vv = jnp.repeat(v, 2, axis=2)
    expected = jax.nn.dot_product_attention(q, kk, vv, is_causal=True)
    assert_close(o, expected, jnp.float32)


def test_vmap_jit_grad():
    config = CONFIGS["square-gqa2"]
    opts = sparsek_options(config)
    q, k, v, scores = sparsek_inputs(config, seed=6)
    do = cotangent(config)
    stack = lambda x: jnp.stack([x, 0.5 * x])
    qs, ks, vs, ss = map(stack, (q, k, v, scores))

    def loss(q, k, v, s):
        return jnp.sum(sparsek_attention(q, k, v, s, implementation="ffi", **opts) * do)

    reference_fn = value_and_grads(config, "xla")  # o and the vjp of do: the gradients of loss
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))))
    values, grads = batched(qs, ks, vs, ss)
    for m in range(2):
        o_ref, grads_ref = reference_fn(qs[m], ks[m], vs[m], ss[m], do)
        assert abs(float(values[m]) - float(jnp.sum(o_ref * do))) < 1e-4 * float(jnp.sum(jnp.abs(o_ref * do)))
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g[m], g_ref, jnp.float32, factor=4.0)
    # vmap over q only (k, v, scores shared), and the scores' gradient through that vmap.
    g_scores = jax.jit(jax.grad(lambda s: jnp.sum(jax.vmap(lambda q: loss(q, k, v, s))(qs))))(scores)
    g_scores_ref = 0.0
    for m in range(2):
        o_ref, grads_ref = reference_fn(qs[m], k, v, scores, do)
        g_scores_ref = g_scores_ref + grads_ref[3]
        assert_close(jax.vmap(lambda q: sparsek_attention(q, k, v, scores, implementation="ffi",
                                                          **opts))(qs)[m], o_ref, jnp.float32)
    assert_close(g_scores, g_scores_ref, jnp.float32, factor=4.0)


def test_lowering_calls_the_ffi_targets():
    config = CONFIGS["square-gqa2"]
    opts = sparsek_options(config)
    q, k, v, scores = sparsek_inputs(config)
    fwd = lambda q, k, v, s: sparsek_attention(q, k, v, s, **opts)  # default: the kernels
    assert_custom_call(fwd, q, k, v, scores, target=sparsek_ffi.SELECT_TARGET)
    assert_custom_call(fwd, q, k, v, scores, target=sparsek_ffi.FWD_TARGET)
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2, 3))
    assert_custom_call(grad, q, k, v, scores, target=sparsek_ffi.BWD_TARGET)


def test_reference_module_maps_sparsek_attention():
    assert reference.sparsek_attention is sparsek_reference.sparsek_attention
    config = CONFIGS["noncausal"]
    q, k, v, scores = sparsek_inputs(config, seed=7)
    assert_close(reference.sparsek_attention(q, k, v, scores, **sparsek_options(config)),
                 sparsek_attention(q, k, v, scores, implementation="xla", **sparsek_options(config)),
                 jnp.float32)


@pytest.mark.parametrize("change,error,name", [
    (dict(k_select=0), ValueError, "k_select"),
    (dict(k_select=2.0), TypeError, "k_select"),
    (dict(window=-1), ValueError, "window"),
    (dict(scores_shape=(1, 16, 1)), ValueError, "scores"),
    (dict(scores_dtype=jnp.float16), TypeError, "scores"),
    (dict(kv_heads=3), ValueError, "N=4"),
])
@pytest.mark.parametrize("implementation", ["ffi", "xla"])
def test_bad_arguments_raise_with_their_name(change, error, name, implementation):
    B, T, S, N, K, D = 1, 16, 16, 4, change.get("kv_heads", 2), 8
    q = jnp.zeros((B, T, N, D))
    k = v = jnp.zeros((B, S, K, D))
    scores = jnp.zeros(change.get("scores_shape", (B, S, K)), change.get("scores_dtype", jnp.float32))
    kwargs = dict(k_select=change.get("k_select", 2), window=change.get("window", 1))
    with pytest.raises(error, match=name):
        sparsek_attention(q, k, v, scores, implementation=implementation, **kwargs)


def test_huge_k_select_and_window_mean_everything():
    config = CONFIGS["square-gqa2"]
    q, k, v, scores = sparsek_inputs(config, seed=8)
    S, T = k.shape[1], q.shape[1]
    for implementation in ("ffi", "xla"):
        run = lambda **kw: sparsek_attention(q, k, v, scores, implementation=implementation, **kw)
        np.testing.assert_array_equal(run(k_select=10**15, window=1), run(k_select=S, window=1))
        np.testing.assert_array_equal(run(k_select=2, window=10**15), run(k_select=2, window=S + T))
