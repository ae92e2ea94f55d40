"""The decode kernel (jax_sparsek_decode_fwd) against its float32 reference: both cache
layouts, weights with masked entries, a key_begin, GQA groups that do not fill a CTA's four
heads, and enough entries for several splits. CPU tests run the C++ kernel; the `gpu` ones
the CUDA kernel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparsek import decode
from jax_sparsek.testing import assert_close, assert_custom_call, hlo_text, upcast


def make_case(B, R, N, K, D, dtype, heads_first, weighted, seed):
    rng = np.random.default_rng(seed)
    kv_shape = (B, K, R, D) if heads_first else (B, R, K, D)
    q = jnp.asarray(rng.standard_normal((B, 1, N, D), np.float32), dtype)
    k = jnp.asarray(rng.standard_normal(kv_shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(kv_shape, np.float32), dtype)
    w = None
    if weighted:  # a third of the entries masked (0 or negative), the rest in (0, 1]
        w = rng.uniform(0.0, 1.0, (B, K, R)).astype(np.float32)
        masked = rng.random((B, K, R)) < 0.33
        w[masked] = rng.choice([0.0, -0.5], size=int(masked.sum()))
        w = jnp.asarray(w)
    return q, k, v, w


def check_case(B, R, N, K, D, dtype, heads_first, weighted, key_begin, seed=0):
    q, k, v, w = make_case(B, R, N, K, D, dtype, heads_first, weighted, seed)
    scale = 1.0 / np.sqrt(D)
    o, lse = jax.jit(lambda q, k, v, w: decode.decode_forward(
        q, k, v, w, scale=scale, key_begin=key_begin, heads_first=heads_first))(q, k, v, w)
    # The reference sees the same masking as zero weights on the entries before key_begin.
    weights = jnp.ones((B, K, R), jnp.float32) if w is None else w
    weights = jnp.where(jnp.arange(R) >= key_begin, weights, 0.0)
    o_ref, lse_ref = decode.reference(*upcast(q, k, v), weights, scale=scale,
                                      heads_first=heads_first)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (B, N, 1)
    assert_close(o, o_ref, dtype, what="o")
    finite = np.isfinite(np.asarray(lse_ref))
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite],
                               rtol=1e-3, atol=1e-3)
    assert np.all(np.asarray(o, np.float32)[:, 0][~finite[..., 0]] == 0.0)  # rows that see nothing


CASES = [  # B, R, N, K, D, heads_first, weighted, key_begin
    (2, 300, 8, 2, 64, True, True, 0),       # group of 4
    (1, 3000, 6, 1, 128, True, True, 0),     # group of 6: two head groups, several splits
    (3, 517, 4, 4, 128, False, False, 0),    # the attention layout, no weights, MHA
    (2, 1000, 8, 2, 64, False, False, 900),  # key_begin: only the last 100 entries
    (1, 64, 2, 1, 128, True, True, 64),      # key_begin past the last entry: nothing seen
]


@pytest.mark.parametrize("B,R,N,K,D,heads_first,weighted,key_begin", CASES)
def test_decode_cpu_matches_reference(B, R, N, K, D, heads_first, weighted, key_begin):
    check_case(B, R, N, K, D, "float32", heads_first, weighted, key_begin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("B,R,N,K,D,heads_first,weighted,key_begin", CASES + [
    (8, 20000, 32, 8, 128, False, False, 0),  # decode128k's layout at a smaller cache
    (4, 1536, 32, 8, 64, True, True, 0),      # a SparseK decode cache
])
def test_decode_cuda_matches_reference(B, R, N, K, D, heads_first, weighted, key_begin, dtype):
    check_case(B, R, N, K, D, dtype, heads_first, weighted, key_begin, seed=R + N)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.gpu)])
def test_every_weight_zero_gives_zeros_and_no_nan(dtype):
    q, k, v, _ = make_case(2, 1000, 4, 2, 64, dtype, True, False, 0)  # two splits on a GPU
    o, lse = decode.decode_forward(q, k, v, jnp.zeros((2, 2, 1000), jnp.float32), scale=0.125,
                                   heads_first=True)
    assert np.all(np.asarray(o, np.float32) == 0.0) and np.all(np.asarray(lse) == -np.inf)


def test_the_cache_attention_follows_the_implementation_switch():
    from jax_sparsek.flax import _common

    q, k, v, w = make_case(1, 40, 4, 2, 16, "float32", True, True, 5)
    parts = [(k, v, w), (k[:, :, :7], v[:, :, :7], jnp.ones((1, 2, 7), jnp.float32))]
    fns = {impl: (lambda q, parts, impl=impl: _common._cache_attention(q, parts, 0.25, impl))
           for impl in ("ffi", "xla")}
    assert_close(fns["ffi"](q, parts), fns["xla"](q, parts), "float32")
    assert_custom_call(fns["ffi"], q, parts, target=decode.TARGET)
    assert decode.TARGET not in hlo_text(fns["xla"], q, parts)


def test_cache_attention_gradients_through_the_merge():
    # The FFI path merges the parts by their lse, so its gradients flow through each part's lse
    # cotangent; the xla path differentiates one softmax over the concatenated parts. A part
    # whose gates are all 0 (lse = -inf, as at the start of decoding) must add nothing, not NaN.
    from jax_sparsek.flax import _common

    q, k, v, w = make_case(1, 40, 4, 2, 16, "float32", True, True, 7)
    w = jnp.abs(w) + 0.01  # every entry of the first part on: its gates' gradient is defined
    k2, v2 = k[:, :, :9] * 0.5, v[:, :, :9] + 1.0
    for second_gate in (jnp.full((1, 2, 9), 0.7, jnp.float32), jnp.zeros((1, 2, 9), jnp.float32)):
        def loss(impl, q, k, v, w, k2, v2):
            parts = [(k, v, w), (k2, v2, second_gate)]
            return jnp.sum(jnp.sin(_common._cache_attention(q, parts, 0.25, impl)))
        grads = {impl: jax.grad(functools.partial(loss, impl), argnums=range(6))(q, k, v, w, k2, v2)
                 for impl in ("ffi", "xla")}
        for what, g, r in zip(("q", "k", "v", "gate", "k2", "v2"), grads["ffi"], grads["xla"]):
            assert np.all(np.isfinite(np.asarray(g))), what
            assert_close(g, r, "float32", what=what)


def test_weighted_decode_gradients_match_reference():
    q, k, v, w = make_case(1, 50, 4, 2, 16, "float32", True, True, 3)
    w = jnp.abs(w) + 0.01  # every entry on: the weights' gradient is defined everywhere
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))
    got = jax.grad(loss(lambda *a: decode.weighted_decode_attention(*a, 0.25)), argnums=(0, 1, 2, 3))(q, k, v, w)
    want = jax.grad(loss(lambda *a: decode.reference(*a, scale=0.25, heads_first=True)),
                    argnums=(0, 1, 2, 3))(q, k, v, w)
    for g, r in zip(got, want):
        assert_close(g, r, "float32")
    assert_custom_call(lambda *a: decode.weighted_decode_attention(*a, 0.25), q, k, v, w,
                       target=decode.TARGET)


def test_splits_fill_the_gpu_and_keep_splits_long():
    assert decode.num_splits(8, 8, 4, 131072) == 33    # 64 CTAs -> 33 splits of ~4k entries
    assert decode.num_splits(1, 1, 4, 3000) == 6       # no split under 512 entries
    assert decode.num_splits(64, 8, 4, 1024) == 2
    assert decode.num_splits(512, 8, 4, 100_000) == 1  # the batch already fills the GPU
    assert decode.num_splits(2, 2, 4, 0) == 1
    # The handlers accept at most max(1, ceil(R / 64)) splits; the heuristic stays below.
    assert all(decode.num_splits(b, 8, 4, r) <= max(1, -(-r // 64))
               for b in (1, 8, 64) for r in (0, 1, 100, 4096, 131072))


def test_the_kernel_returns_errors_not_aborts():
    q, k, v, _ = make_case(1, 32, 4, 2, 16, "float32", True, False, 0)

    def call(q, lse_shape, partials_shape):  # a hand-built call, results as given
        results = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(lse_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partials_shape, jnp.float32))
        return jax.ffi.ffi_call(decode.TARGET, results)(
            q, k, v, jnp.zeros((1, 2, 0), jnp.float32), scale=np.float32(0.25),
            key_begin=np.int64(0), heads_first=True)

    with pytest.raises(Exception, match="partials must have shape"):
        call(q, (1, 4, 1), (1, 4, 1, 16))
    with pytest.raises(Exception, match=r"splits in \[1, 1\]"):  # 32 entries: one split at most
        call(q, (1, 4, 1), (1, 4, 2, 17))
    with pytest.raises(Exception, match="one query per sequence"):
        call(jnp.concatenate([q, q], axis=1), (1, 4, 2), (1, 4, 1, 17))
    with pytest.raises(Exception, match="lse must have shape"):
        call(q, (1, 4, 2), (1, 4, 1, 17))


@pytest.mark.gpu
def test_sparsek_cache_attention_on_the_kernel_matches_reference():
    """The Flax decode step's attention: both cache parts through the kernel, merged by lse."""
    from jax_sparsek.flax import _common

    B, K, N, D = 2, 2, 8, 128
    q, k1, v1, w1 = make_case(B, 64, N, K, D, "bfloat16", True, True, 1)
    _, k2, v2, w2 = make_case(B, 300, N, K, D, "bfloat16", True, True, 2)
    w1 = w1.at[1].set(0.0)  # batch row 1: the window part sees nothing
    parts = [(k1, v1, w1), (k2, v2, w2)]
    got = jax.jit(lambda q, parts: _common._cache_attention(q, parts, 0.1))(q, parts)
    cat = lambda *xs: jnp.concatenate(xs, axis=2)
    want = decode.reference(*upcast(q, cat(k1, k2), cat(v1, v2)), cat(w1, w2), scale=0.1,
                            heads_first=True)[0]
    assert_close(got, want, "bfloat16")
    assert_custom_call(lambda q, parts: _common._cache_attention(q, parts, 0.1), q, parts,
                       target=decode.TARGET)
