"""block_sparse_attention: the FFI kernels against the pure-JAX reference, values and
gradients, over block sizes, mask densities and broadcast mask shapes; off blocks are never
read; jit/vmap/grad composition; argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_sparsek.block_sparse import block_sparse_attention, reference
from jax_sparsek.flash_attention import flash_attention
from jax_sparsek.testing import AttentionSpec, assert_close, assert_custom_call, upcast

FWD_TARGET, BWD_TARGET = "jax_sparsek_block_sparse_fwd", "jax_sparsek_block_sparse_bwd"
GRAD_FACTOR = 4.0  # gradients go through more rounding steps than the output
# The references only check values: compile them fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_inputs(spec: AttentionSpec, seed: int):
    """Fresh normal q, k, v and an output cotangent do in the spec's dtype."""
    rng = np.random.default_rng(seed)
    shapes = [(spec.B, spec.T, spec.N, spec.D), (spec.B, spec.s, spec.k, spec.D),
              (spec.B, spec.s, spec.k, spec.dv), (spec.B, spec.T, spec.N, spec.dv)]
    return [jnp.asarray(rng.standard_normal(s, np.float32), spec.dtype) for s in shapes]


def make_mask(spec: AttentionSpec, seed: int, batches: int, heads: int, density: float):
    bq, bk = spec.block_size
    shape = (batches, heads, math.ceil(spec.T / bq), math.ceil(spec.s / bk))
    return jnp.asarray(np.random.default_rng(seed + 7).random(shape) < density)


def value_and_grads(fn, q, k, v, do, compiler_options=None):
    """(o, dq, dk, dv) of fn at (q, k, v) for the cotangent do, in one compiled call."""

    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run, compiler_options=compiler_options)(q, k, v, do)


def fast_jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def assert_matches(x, ref, dtype, factor=1.0, what="result"):
    """assert_close, or all zeros where the exact result vanishes (no row sees two keys)."""
    ref32 = np.asarray(ref, np.float32)
    if np.linalg.norm(ref32) <= 1e-6 * np.sqrt(ref32.size):
        np.testing.assert_allclose(np.asarray(x, np.float32), 0.0, atol=1e-4, err_msg=what)
    else:
        assert_close(x, ref, dtype, factor=factor, what=what)


def check_against_reference(spec: AttentionSpec, mask, seed: int, inputs=None):
    q, k, v, do = make_inputs(spec, seed) if inputs is None else inputs
    kw = dict(block_size=spec.block_size, causal=spec.causal)
    got = value_and_grads(
        lambda q, k, v: block_sparse_attention(q, k, v, mask, implementation="ffi", **kw),
        q, k, v, do)
    want = value_and_grads(lambda q, k, v: reference.block_sparse_attention(q, k, v, mask, **kw),
                           *upcast(q, k, v, do), compiler_options=FAST_COMPILE)
    for name, g, w, x_in in zip(("o", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.dtype == x_in.dtype and g.shape == (w.shape if name == "o" else x_in.shape), name
        assert_matches(g, w, spec.dtype, factor=1.0 if name == "o" else GRAD_FACTOR, what=name)
    return got


# (B, T, S, N, K, D, Dv, dtype, causal, block_size, mask batches "B"/"1", mask heads "N"/"K"/"1", density)
CASES = [
    (2, 37, 53, 4, 2, 16, 16, "float32", False, (16, 16), "B", "N", 0.5),
    (1, 100, 100, 4, 1, 64, 64, "float32", True, (32, 8), "1", "1", 0.5),    # bk does not divide S
    (2, 70, 45, 4, 2, 32, 48, "float32", True, (7, 16), "B", "K", 0.6),      # T > S, mask per kv head
    (1, 45, 70, 2, 2, 80, 80, "float32", False, (128, 32), "1", "N", 0.5),   # one query block
    (1, 200, 150, 2, 2, 16, 16, "float32", False, (64, 16), "B", "N", 0.2),  # runs of on-blocks
    (1, 130, 130, 2, 1, 16, 16, "float32", True, (96, 100), "B", "K", 0.7),  # blocks wider than tiles
    (1, 128, 128, 2, 1, 64, 64, "bfloat16", True, (64, 64), "B", "N", 0.3),
    (2, 50, 90, 4, 2, 128, 128, "float16", False, (16, 48), "B", "K", 0.4),
    (1, 33, 33, 8, 2, 16, 32, "bfloat16", True, (1, 1), "1", "K", 0.7),     # element-wise mask
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "B{}T{}S{}N{}K{}D{}Dv{}-{}-causal{}-bs{}-mask{}{}-d{}".format(*c))
def test_matches_reference(case):
    B, T, S, N, K, D, Dv, dtype, causal, block_size, mb, mh, density = case
    spec = AttentionSpec(B=B, T=T, S=S, N=N, K=K, D=D, Dv=Dv, dtype=dtype, causal=causal,
                         block_size=block_size)
    seed = CASES.index(case)
    mask = make_mask(spec, seed, B if mb == "B" else 1, {"N": N, "K": K, "1": 1}[mh], density)
    check_against_reference(spec, mask, seed)


def test_all_off_rows_give_zeros():
    spec = AttentionSpec(B=2, T=40, S=40, N=2, K=1, D=16, block_size=(8, 8))
    mask = np.random.default_rng(0).random((2, 2, 5, 5)) < 0.6
    mask[:, :, 1] = False     # query block 1 sees nothing
    mask[0, 1, 3] = False     # nor does block 3 of batch 0, head 1
    mask[:, :, 0, 0] = True   # and block 0 sees something
    o, dq, _, _ = check_against_reference(spec, jnp.asarray(mask), seed=1)
    np.testing.assert_array_equal(np.asarray(o[:, 8:16]), 0)
    np.testing.assert_array_equal(np.asarray(dq[:, 8:16]), 0)
    np.testing.assert_array_equal(np.asarray(o[0, 24:32, 1]), 0)


def test_empty_mask_gives_zeros():
    spec = AttentionSpec(B=1, T=20, S=30, N=2, D=16, block_size=(8, 8))
    q, k, v, do = make_inputs(spec, 2)
    mask = jnp.zeros((1, 1, 3, 4), bool)
    o, dq, dk, dv = value_and_grads(
        lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=(8, 8)), q, k, v, do)
    for x in (o, dq, dk, dv):
        np.testing.assert_array_equal(np.asarray(x), 0)


def test_full_mask_equals_flash_attention():
    spec = AttentionSpec(B=1, T=50, S=70, N=4, K=2, D=32, block_size=(16, 32))
    q, k, v, do = make_inputs(spec, 3)
    mask = jnp.ones((1, 1, 4, 3), bool)
    for causal in (False, True):
        got = value_and_grads(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block_size=(16, 32), causal=causal), q, k, v, do)
        want = value_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v, do)
        for g, w in zip(got, want):
            assert_close(g, w, "float32")


def test_off_blocks_are_never_read():
    # Keys of a key block that is off for every query hold NaN: a kernel that touched them
    # (even to multiply by a zero probability) would return NaN. They are invisible, so the
    # result must equal the reference on any finite values there.
    spec = AttentionSpec(B=1, T=48, S=64, N=2, K=1, D=16, block_size=(16, 16), causal=True)
    q, k, v, do = make_inputs(spec, 4)
    mask = np.random.default_rng(4).random((1, 2, 3, 4)) < 0.7
    mask[..., 2] = False
    mask[..., 0] = True
    mask = jnp.asarray(mask)
    kw = dict(block_size=(16, 16), causal=True)
    poisoned = lambda x: x.at[:, 32:48].set(jnp.nan)
    got = value_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, mask, **kw),
                          q, poisoned(k), poisoned(v), do)
    want = value_and_grads(lambda q, k, v: reference.block_sparse_attention(q, k, v, mask, **kw),
                           q, k, v, do, compiler_options=FAST_COMPILE)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(g, w, "float32", factor=1.0 if name == "o" else GRAD_FACTOR, what=name)
    np.testing.assert_array_equal(np.asarray(got[2][:, 32:48]), 0)
    np.testing.assert_array_equal(np.asarray(got[3][:, 32:48]), 0)


# ---- composition -------------------------------------------------------------------

def test_vmap_with_shared_and_mapped_masks():
    spec = AttentionSpec(B=2, T=30, S=40, N=4, K=2, D=16, block_size=(8, 16), causal=True)
    xs = [make_inputs(spec, s) for s in range(3)]
    q, k, v = (jnp.stack([x[i] for x in xs]) for i in range(3))
    shared = make_mask(spec, 0, 1, 1, 0.6)              # [1, 1, 4, 3], broadcast over batch
    per_batch = make_mask(spec, 1, 2, 2, 0.6)           # [B, K, 4, 3]
    mapped = jnp.stack([make_mask(spec, s, 1, 4, 0.6) for s in range(3)])  # [3, 1, N, 4, 3]
    kw = dict(block_size=(8, 16), causal=True)
    ffi_fn = lambda q, k, v, m: block_sparse_attention(q, k, v, m, implementation="ffi", **kw)
    ref_fn = lambda q, k, v, m: reference.block_sparse_attention(q, k, v, m, **kw)
    for mask, axes in ((shared, (0, 0, 0, None)), (per_batch, (0, 0, 0, None)),
                       (mapped, (0, 0, 0, 0)), (per_batch, (0, None, None, None))):
        args = (q, k[0] if axes[1] is None else k, v[0] if axes[2] is None else v, mask)
        got = jax.jit(jax.vmap(ffi_fn, in_axes=axes))(*args)
        want = fast_jit(jax.vmap(ref_fn, in_axes=axes))(*args)
        assert_close(got, want, "float32")
    assert_custom_call(jax.vmap(ffi_fn, in_axes=(0, 0, 0, None)), q, k, v, shared, target=FWD_TARGET)


def test_grad_of_vmap_and_jit():
    spec = AttentionSpec(B=1, T=24, S=24, N=2, K=1, D=16, block_size=(8, 8), causal=True)
    xs = [make_inputs(spec, s) for s in range(2)]
    q, k, v = (jnp.stack([x[i] for x in xs]) for i in range(3))
    mask = make_mask(spec, 0, 1, 2, 0.7)
    kw = dict(block_size=(8, 8), causal=True)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.tanh(jax.vmap(fn, in_axes=(0, None, 0))(q, k, v)))
        return jax.grad(loss, argnums=(0, 1, 2))

    got = jax.jit(grads(lambda q, k, v: block_sparse_attention(q, k, v, mask, **kw)))(q, k[0], v)
    want = fast_jit(grads(lambda q, k, v: reference.block_sparse_attention(q, k, v, mask, **kw)))(
        q, k[0], v)
    for g, w in zip(got, want):
        assert_close(g, w, "float32", factor=GRAD_FACTOR)
    loss = lambda q, k, v: block_sparse_attention(q, k, v, mask, **kw).sum()
    assert_custom_call(jax.grad(loss, argnums=(0, 1, 2)), q[0], k[0], v[0], target=BWD_TARGET)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.integers(1, 24), st.integers(1, 24), st.booleans(), st.sampled_from(["N", "K", "1"]),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_fuzz_shapes(T, S, heads, bq, bk, causal, mask_heads, density, seed):
    N, K = heads
    spec = AttentionSpec(B=1, T=T, S=S, N=N, K=K, D=16, causal=causal, block_size=(bq, bk))
    mask = make_mask(spec, seed, 1, {"N": N, "K": K, "1": 1}[mask_heads], density)
    check_against_reference(spec, mask, seed)


# ---- argument checks ---------------------------------------------------------------

def _args():
    spec = AttentionSpec(B=2, T=20, S=30, N=4, K=2, D=16, block_size=(8, 16))
    q, k, v, _ = make_inputs(spec, 0)
    return q, k, v, make_mask(spec, 0, 2, 4, 0.5)  # mask [2, 4, 3, 2]


@pytest.mark.parametrize("mask,exc,match", [
    (lambda m: m.astype(jnp.int32), TypeError, "block_mask"),
    (lambda m: m.astype(jnp.float32), TypeError, "block_mask"),
    (lambda m: np.asarray(m).tolist(), TypeError, "block_mask"),
    (lambda m: m[0], ValueError, r"block_mask must have shape \[B=2 or 1, N=4 or K=2 or 1, "
                                 r"ceil\(T/bq\)=3, ceil\(S/bk\)=2\]"),
    (lambda m: m[:, :3], ValueError, "block_mask"),              # 3 heads: neither N, K nor 1
    (lambda m: jnp.concatenate([m, m, m]), ValueError, "block_mask"),  # batch 6
    (lambda m: m[:, :, :2], ValueError, "block_mask"),           # too few query blocks
    (lambda m: m[:, :, :, :1], ValueError, "block_mask"),        # too few key blocks
])
def test_bad_block_mask_raises(mask, exc, match):
    q, k, v, m = _args()
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, mask(m), block_size=(8, 16))
    with pytest.raises(exc, match=match):
        reference.block_sparse_attention(q, k, v, mask(m), block_size=(8, 16))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(block_size=8), TypeError, "block_size"),
    (dict(block_size=(8, 16, 1)), TypeError, "block_size"),
    (dict(block_size=(0, 16)), ValueError, "block_size"),
    (dict(block_size=(8, -1)), ValueError, "block_size"),
    (dict(block_size=(8.0, 16)), TypeError, "block_size"),
    (dict(block_size=(8, 16), causal=None), TypeError, "causal"),
    (dict(block_size=(8, 16), deterministic="yes"), TypeError, "deterministic"),
    (dict(block_size=(8, 16), scale=jnp.float32(0.1)), TypeError, "scale"),
])
def test_bad_options_raise(kw, exc, match):
    with pytest.raises(exc, match=match):
        block_sparse_attention(*_args(), **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q[..., 0], k, v), ValueError, "q"),
    (lambda q, k, v: (q, k, v.astype(jnp.float16)), TypeError, "dtype"),
    (lambda q, k, v: (q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2)), ValueError, "K=3"),
    (lambda q, k, v: (q.astype(jnp.int8), k.astype(jnp.int8), v.astype(jnp.int8)), TypeError, "q"),
])
def test_bad_arrays_raise(mutate, exc, match):
    q, k, v, m = _args()
    with pytest.raises(exc, match=match):
        block_sparse_attention(*mutate(q, k, v), m, block_size=(8, 16))


def test_handler_rejects_bad_mask():
    q, k, v, m = _args()
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((2, 4, 20), jnp.float32))
    attrs = dict(scale=np.float32(0.25), causal=False, block_q=np.int64(8), block_k=np.int64(16))
    call = jax.ffi.ffi_call(FWD_TARGET, out)
    with pytest.raises(Exception, match="block_mask must have shape"):
        call(q, k, v, m[:, :, :2], **attrs)
    with pytest.raises(Exception, match="block_mask must be bool"):
        call(q, k, v, m.astype(jnp.int8), **attrs)
    with pytest.raises(Exception, match="block_q and block_k must be positive"):
        call(q, k, v, m, **{**attrs, "block_q": np.int64(0)})
