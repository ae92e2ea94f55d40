"""flash_attention: the FFI kernels against the pure-JAX reference and jax.nn, values and
gradients, over shapes, masks and dtypes; jit/vmap/grad composition; argument checks."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_sparsek.flash_attention import flash_attention, reference
from jax_sparsek.testing import AttentionSpec, assert_close, assert_custom_call, upcast

FWD_TARGET, BWD_TARGET = "jax_sparsek_flash_fwd", "jax_sparsek_flash_bwd"
GRAD_FACTOR = 4.0  # gradients go through more rounding steps than the output
# The references only check values: compile them fast (XLA's CPU backend optimizations
# double the compile time of these small graphs and buy nothing here).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_inputs(spec: AttentionSpec, seed: int):
    """Fresh normal q, k, v and an output cotangent do, in the spec's dtype (numpy's
    generator: no compilation per shape)."""
    rng = np.random.default_rng(seed)
    shapes = [(spec.B, spec.T, spec.N, spec.D), (spec.B, spec.s, spec.k, spec.D),
              (spec.B, spec.s, spec.k, spec.dv), (spec.B, spec.T, spec.N, spec.dv)]
    return [jnp.asarray(rng.standard_normal(s, np.float32), spec.dtype) for s in shapes]


def value_and_grads(fn, q, k, v, do, compiler_options=None):
    """(o, dq, dk, dv) of fn at (q, k, v) for the cotangent do, in one compiled call."""

    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run, compiler_options=compiler_options)(q, k, v, do)


def check_against_reference(spec: AttentionSpec, seed: int, window=None):
    q, k, v, do = make_inputs(spec, seed)
    kw = dict(causal=spec.causal, window=window)
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, implementation="ffi", **kw),
                          q, k, v, do)
    # The reference runs in float32 on the same (rounded) inputs.
    want = value_and_grads(lambda q, k, v: reference.flash_attention(q, k, v, **kw),
                           *upcast(q, k, v, do), compiler_options=FAST_COMPILE)
    for name, g, w, x_in in zip(("o", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.dtype == x_in.dtype and g.shape == (w.shape if name == "o" else x_in.shape), name
        assert_matches(g, w, spec.dtype, factor=1.0 if name == "o" else GRAD_FACTOR, what=name)
    return got


def assert_matches(x, ref, dtype, factor=1.0, what="result"):
    """assert_close, except where the exact result vanishes: dq and dk are 0 when every row
    sees at most one key (its softmax is constant) and the kernel's are rounding noise."""
    ref32 = np.asarray(ref, np.float32)
    if np.linalg.norm(ref32) <= 1e-6 * np.sqrt(ref32.size):
        np.testing.assert_allclose(np.asarray(x, np.float32), 0.0, atol=1e-4, err_msg=what)
    else:
        assert_close(x, ref, dtype, factor=factor, what=what)


# (B, T, S, N, K, D, Dv, dtype, causal, window)
CASES = [
    (2, 37, 53, 4, 2, 16, 16, "float32", False, None),
    (1, 37, 53, 4, 1, 64, 64, "float32", True, None),
    (2, 53, 37, 2, 2, 80, 48, "float32", True, None),         # T > S: leading rows see nothing
    (1, 50, 50, 4, 2, 128, 128, "float32", False, (5, None)),  # left bound only
    (1, 40, 70, 2, 1, 16, 32, "float32", False, (None, 3)),    # right bound only
    (2, 70, 40, 4, 2, 32, 32, "float32", False, (4, 6)),
    (1, 130, 130, 2, 1, 32, 32, "float32", True, (16, None)),  # several tiles, sliding window
    (1, 1, 77, 8, 2, 64, 64, "float32", True, None),           # one decoding query
    (1, 100, 100, 4, 2, 64, 64, "bfloat16", True, None),
    (2, 33, 65, 2, 2, 16, 32, "float16", False, (10, 10)),
    (1, 70, 70, 2, 2, 128, 128, "float16", False, None),
    (1, 45, 30, 4, 4, 80, 80, "bfloat16", True, (3, 2)),
    (1, 200, 200, 2, 1, 64, 64, "float32", True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}N{}K{}D{}Dv{}-{}-causal{}-w{}".format(*c))
def test_matches_reference(case):
    B, T, S, N, K, D, Dv, dtype, causal, window = case
    spec = AttentionSpec(B=B, T=T, S=S, N=N, K=K, D=D, Dv=Dv, dtype=dtype, causal=causal)
    check_against_reference(spec, seed=CASES.index(case), window=window)


def test_rows_that_see_nothing_are_zero():
    # T > S with causal: query rows i < T - S sit before the first key.
    spec = AttentionSpec(B=1, T=20, S=8, N=2, D=16, causal=True)
    o, dq, _, _ = check_against_reference(spec, seed=7)
    assert np.all(np.asarray(o[:, :12]) == 0) and np.all(np.asarray(dq[:, :12]) == 0)
    assert np.any(np.asarray(o[:, 12:]) != 0)


def test_window_excluding_every_key_gives_zeros():
    # Right bound 0 and left bound 0 with T > S: rows before the keys see nothing, the rest one key.
    q, k, v, _ = make_inputs(AttentionSpec(B=1, T=12, S=4, N=1, D=16), 3)
    o = flash_attention(q, k, v, window=(0, 0), implementation="ffi")
    np.testing.assert_array_equal(np.asarray(o[:, :8]), 0)
    # Each of the last 4 rows sees exactly its own key: the output is that key's value.
    np.testing.assert_allclose(np.asarray(o[:, 8:, 0]), np.asarray(v[:, :, 0]), rtol=1e-6)


@pytest.mark.parametrize("causal,window,K", [(False, None, 4), (True, None, 2), (False, (7, 3), 4),
                                             (True, (9, 0), 1), (False, (0, 12), 2)])
def test_matches_jax_nn(causal, window, K):
    q, k, v, _ = make_inputs(AttentionSpec(B=2, T=48, N=4, K=K, D=32), 11)
    got = flash_attention(q, k, v, causal=causal, window=window, implementation="ffi")
    want = fast_jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, local_window_size=window, implementation="xla"))(q, k, v)
    assert_close(got, want, "float32")
    # The reference agrees with jax.nn too.
    ref = fast_jit(lambda q, k, v: reference.flash_attention(q, k, v, causal=causal, window=window))
    assert_close(ref(q, k, v), want, "float32")


def test_scale_and_default_implementation():
    q, k, v, _ = make_inputs(AttentionSpec(B=1, T=24, N=2, D=16), 5)
    got = flash_attention(q, k, v, scale=0.3)  # default implementation: the CPU kernels
    assert_close(got, fast_jit(lambda q, k, v: reference.flash_attention(q, k, v, scale=0.3))(q, k, v),
                 "float32")
    assert_close(flash_attention(q, k, v, scale=0.3, implementation="xla"), got, "float32")
    assert_custom_call(lambda q, k, v: flash_attention(q, k, v), q, k, v, target=FWD_TARGET)
    text = jax.jit(lambda q, k, v: flash_attention(q, k, v, implementation="xla")).lower(q, k, v).as_text()
    assert FWD_TARGET not in text


def test_gradient_lowers_to_backward_kernel():
    q, k, v, _ = make_inputs(AttentionSpec(B=1, T=16, N=2, D=16), 0)
    loss = lambda q, k, v: flash_attention(q, k, v, causal=True).sum()
    assert_custom_call(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, target=BWD_TARGET)


def test_deterministic_reaches_the_backward_kernel():
    # The attribute is lowered into the backward call, and the CPU handler takes it (its
    # kernels are deterministic either way): gradients as the reference's.
    q, k, v, _ = make_inputs(AttentionSpec(B=1, T=16, N=2, D=16), 0)
    grad = lambda f: jax.jit(jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)))
    want = grad(lambda q, k, v: reference.flash_attention(q, k, v, causal=True))(q, k, v)
    for flag in (False, True):
        fn = grad(lambda q, k, v: flash_attention(q, k, v, causal=True, deterministic=flag))
        assert f"deterministic = {str(flag).lower()}" in fn.lower(q, k, v).as_text()
        for g, w in zip(fn(q, k, v), want):
            assert_close(g, w, "float32")


# ---- composition -------------------------------------------------------------------

def _stack_inputs(spec, seeds):
    xs = [make_inputs(spec, s) for s in seeds]
    return [jnp.stack([x[i] for x in xs]) for i in range(3)]


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def test_vmap_folds_into_batch():
    spec = AttentionSpec(B=2, T=19, S=23, N=4, K=2, D=16)
    q, k, v = _stack_inputs(spec, [1, 2, 3])
    kw = dict(causal=True, window=(5, None))
    ffi_fn = lambda q, k, v: flash_attention(q, k, v, implementation="ffi", **kw)
    ref_fn = lambda q, k, v: reference.flash_attention(q, k, v, **kw)
    assert_close(jax.jit(jax.vmap(ffi_fn))(q, k, v), fast_jit(jax.vmap(ref_fn))(q, k, v), "float32")
    # k and v shared by every mapped q.
    shared = (0, None, None)
    assert_close(jax.vmap(ffi_fn, in_axes=shared)(q, k[0], v[0]),
                 fast_jit(jax.vmap(ref_fn, in_axes=shared))(q, k[0], v[0]), "float32")
    # The mapped axis folds into the batch: still one call of the kernel.
    assert_custom_call(jax.vmap(ffi_fn), q, k, v, target=FWD_TARGET)


def test_nested_vmap_and_grad():
    spec = AttentionSpec(B=1, T=13, N=2, K=1, D=16)
    q, k, v = _stack_inputs(spec, range(6))
    q, k, v = (x.reshape((2, 3) + x.shape[1:]) for x in (q, k, v))
    ffi_fn = lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="ffi")
    ref_fn = lambda q, k, v: reference.flash_attention(q, k, v, causal=True)

    def per_example_grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
        return jax.vmap(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))

    got = jax.jit(per_example_grads(ffi_fn))(q, k, v)
    want = fast_jit(per_example_grads(ref_fn))(q, k, v)
    for g, w in zip(got, want):
        assert_close(g, w, "float32", factor=GRAD_FACTOR)

    # grad of a vmapped loss, with k unmapped (its cotangent sums over the mapped axis).
    def grad_of_vmap(fn):
        loss = lambda q, k, v: jnp.sum(jax.vmap(fn, in_axes=(0, None, 0))(q, k, v) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))

    got = jax.jit(grad_of_vmap(ffi_fn))(q[0], k[0, 0], v[0])
    want = fast_jit(grad_of_vmap(ref_fn))(q[0], k[0, 0], v[0])
    for g, w in zip(got, want):
        assert_close(g, w, "float32", factor=GRAD_FACTOR)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.sampled_from([16, 32]), st.booleans(),
       st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 20)),
                                      st.one_of(st.none(), st.integers(0, 20)))),
       st.integers(0, 2**16))
def test_fuzz_shapes(T, S, heads, D, causal, window, seed):
    N, K = heads
    spec = AttentionSpec(B=1, T=T, S=S, N=N, K=K, D=D, causal=causal)
    check_against_reference(spec, seed=seed, window=window)


# ---- argument checks ---------------------------------------------------------------

def _inputs(**kw):
    return make_inputs(AttentionSpec(**{**dict(B=1, T=8, N=4, K=2, D=16), **kw}), 0)[:3]


@pytest.mark.parametrize("mutate,exc,name", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q"),
    (lambda q, k, v: (q, k[..., None], v), ValueError, "k"),
    (lambda q, k, v: (q, k, v[:, :3]), ValueError, "v"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "k"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), TypeError, "dtype"),
    (lambda q, k, v: (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), TypeError, "q"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "N=3"),
])
def test_bad_arrays_raise(mutate, exc, name):
    q, k, v = mutate(*_inputs())
    with pytest.raises(exc, match=name):
        flash_attention(q, k, v)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(window=5), TypeError, "window"),
    (dict(window=(1, 2, 3)), TypeError, "window"),
    (dict(window=(-1, 2)), ValueError, "window"),
    (dict(window=(1.5, None)), TypeError, "window"),
    (dict(window=(True, None)), TypeError, "window"),
    (dict(causal=jnp.array(True)), TypeError, "causal"),
    (dict(deterministic=1), TypeError, "deterministic"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(implementation="cuda"), ValueError, "implementation"),
])
def test_bad_options_raise(kw, exc, name):
    with pytest.raises(exc, match=name):
        flash_attention(*_inputs(), **kw)
    if "implementation" not in kw:
        with pytest.raises(exc, match=name):
            reference.flash_attention(*_inputs(), **kw)


def test_handler_rejects_bad_operands():
    # Called directly, the FFI handlers check shapes and dtypes themselves and fail the call
    # with a message (they never crash the process).
    q, k, v = _inputs()
    out = (jax.ShapeDtypeStruct((1, 8, 4, 16), jnp.float32), jax.ShapeDtypeStruct((1, 4, 8), jnp.float32))
    attrs = dict(scale=np.float32(0.25), causal=False, window_left=np.int64(-1),
                 window_right=np.int64(-1))
    call = jax.ffi.ffi_call(FWD_TARGET, out)
    with pytest.raises(Exception, match="k must have shape"):
        call(q, k[..., :8], v, **attrs)
    with pytest.raises(Exception, match="v must be float32"):
        call(q, k, v.astype(jnp.float16), **attrs)
    with pytest.raises(Exception, match="window_left"):
        call(q, k, v, **{**attrs, "window_left": np.int64(-3)})
    bad_lse = (out[0], jax.ShapeDtypeStruct((1, 8, 4), jnp.float32))
    with pytest.raises(Exception, match="lse must have shape"):
        jax.ffi.ffi_call(FWD_TARGET, bad_lse)(q, k, v, **attrs)
