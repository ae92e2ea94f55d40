"""flash_attention and block_sparse_attention on the CUDA kernels (skipped without a GPU):
values and gradients against the float32 reference, and the routing of inputs the CUDA
kernels do not take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparsek import block_sparse_attention, flash_attention, reference
from jax_sparsek.testing import assert_close, assert_custom_call, upcast

pytestmark = pytest.mark.gpu
GRAD_FACTOR = 4.0


def inputs(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def check(fn, ref_fn, q, k, v, dtype):
    do = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape[:3] + v.shape[3:],
                                                                np.float32), dtype)

    def value_and_grads(f, *xs):
        o, vjp = jax.vjp(f, *xs[:3])
        return (o, *vjp(xs[3]))

    got = jax.jit(lambda *xs: value_and_grads(fn, *xs))(q, k, v, do)
    want = jax.jit(lambda *xs: value_and_grads(ref_fn, *xs))(*upcast(q, k, v, do))
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert_close(g, w, dtype, factor=1.0 if name == "o" else GRAD_FACTOR, what=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,T,S,N,K,causal,window", [
    (2, 256, 256, 4, 4, False, None),
    (1, 300, 300, 8, 2, True, None),         # GQA, ragged tiles
    (1, 100, 333, 4, 1, True, None),         # T < S: bottom-right alignment
    (1, 333, 100, 4, 2, True, None),         # T > S: rows that see no key
    (1, 512, 512, 4, 4, True, (100, 0)),     # causal sliding window
    (1, 200, 260, 2, 2, False, (30, 20)),
])
def test_flash_attention_matches_reference(B, T, S, N, K, causal, window, D, dtype):
    q, k, v = inputs([(B, T, N, D), (B, S, K, D), (B, S, K, D)], dtype, seed=T + S + D)
    kw = dict(causal=causal, window=window)
    check(lambda q, k, v: flash_attention(q, k, v, implementation="ffi", **kw),
          lambda q, k, v: reference.flash_attention(q, k, v, **kw), q, k, v, dtype)
    assert_custom_call(lambda q, k, v: flash_attention(q, k, v, **kw), q, k, v,
                       target="jax_sparsek_flash_fwd")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,S,N,K,causal,window", [
    (2, 3000, 8, 2, True, None),     # several splits per (batch, kv head)
    (1, 777, 6, 1, True, (100, 0)),  # a window: only the last 101 keys; two head groups
    (3, 40, 4, 4, False, None),
])
def test_flash_decoding_runs_the_decode_kernel(B, S, N, K, causal, window, D, dtype):
    q, k, v = inputs([(B, 1, N, D), (B, S, K, D), (B, S, K, D)], dtype, seed=S + D)
    kw = dict(causal=causal, window=window)
    check(lambda q, k, v: flash_attention(q, k, v, implementation="ffi", **kw),
          lambda q, k, v: reference.flash_attention(q, k, v, **kw), q, k, v, dtype)
    assert_custom_call(lambda q, k, v: flash_attention(q, k, v, **kw), q, k, v,
                       target="jax_sparsek_decode_fwd")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("block_size,mask_heads,causal", [
    ((128, 128), 2, False), ((64, 96), 4, True), ((200, 50), 1, False)])
def test_block_sparse_matches_reference(block_size, mask_heads, causal, dtype):
    B, T, S, N, K, D = 2, 384, 448, 4, 2, 128
    q, k, v = inputs([(B, T, N, D), (B, S, K, D), (B, S, K, D)], dtype, seed=7)
    shape = (B, mask_heads, -(-T // block_size[0]), -(-S // block_size[1]))
    mask = jnp.asarray(np.random.default_rng(3).random(shape) < 0.4)
    kw = dict(block_size=block_size, causal=causal)
    check(lambda q, k, v: block_sparse_attention(q, k, v, mask, implementation="ffi", **kw),
          lambda q, k, v: reference.block_sparse_attention(q, k, v, mask, **kw), q, k, v, dtype)


@pytest.mark.parametrize("op,B,T,S,N,K,kw", [
    ("flash", 1, 1024, 1024, 4, 2, dict(causal=False)),           # 8 key tiles per query tile
    ("flash", 2, 700, 900, 6, 2, dict(causal=True)),              # GQA, T < S, ragged tiles
    ("flash", 1, 900, 600, 2, 2, dict(causal=True, window=(200, 0))),  # rows that see no key
    ("block_sparse", 1, 768, 1024, 4, 2, dict(block_size=(128, 128), causal=True)),
    ("block_sparse", 2, 500, 640, 2, 1, dict(block_size=(64, 96), causal=False)),
])
def test_deterministic_dq_is_bitwise_reproducible(op, B, T, S, N, K, kw):
    # The key tiles' dq shares are added in a fixed order: repeated runs agree bit for bit, and
    # the gradients match the reference. Block masks with off tiles check that the turns of
    # the tiles a CTA skips are still taken (a missed one would hang the call).
    dtype, D = "bfloat16", 128
    q, k, v = inputs([(B, T, N, D), (B, S, K, D), (B, S, K, D)], dtype, seed=T + S)
    if op == "flash":
        fn = lambda q, k, v, **d: flash_attention(q, k, v, implementation="ffi", **kw, **d)
        ref = lambda q, k, v: reference.flash_attention(q, k, v, **kw)
    else:
        bq, bk = kw["block_size"]
        shape = (B, N, -(-T // bq), -(-S // bk))
        mask = jnp.asarray(np.random.default_rng(5).random(shape) < 0.5)
        fn = lambda q, k, v, **d: block_sparse_attention(q, k, v, mask, implementation="ffi",
                                                         **kw, **d)
        ref = lambda q, k, v: reference.block_sparse_attention(q, k, v, mask, **kw)
    check(lambda q, k, v: fn(q, k, v, deterministic=True), ref, q, k, v, dtype)
    do = inputs([(B, T, N, D)], dtype, seed=3)[0]
    grads = jax.jit(lambda q, k, v, do: jax.vjp(
        lambda q, k, v: fn(q, k, v, deterministic=True), q, k, v)[1](do))
    first = [np.asarray(g) for g in grads(q, k, v, do)]
    for _ in range(4):
        for a, b in zip(first, grads(q, k, v, do)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_inputs_the_cuda_kernels_do_not_take():
    q, k, v = inputs([(1, 64, 2, 32), (1, 64, 2, 32), (1, 64, 2, 32)], "bfloat16", seed=0)
    # Head dim 32 has no CUDA kernel: the default runs the reference, "ffi" says why.
    out = flash_attention(q, k, v, causal=True)
    assert_close(out, reference.flash_attention(*upcast(q, k, v), causal=True), "bfloat16")
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(q, k, v, implementation="ffi")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_attention(*upcast(q, k, v), implementation="ffi")
