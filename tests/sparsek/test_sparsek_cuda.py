"""sparsek_attention on the CUDA kernels (skipped without a GPU): the selection against the CPU
kernel's, values and the gradients of q, k, v and scores against the float32 reference, decoding
shapes, and the routing of inputs the CUDA kernels do not take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sparsek import _ffi, sparsek_attention
from jax_sparsek.sparsek import ffi as sparsek_ffi
from jax_sparsek.sparsek import reference as sparsek_reference
from jax_sparsek.testing import (assert_close, assert_custom_call, sparsek_inputs, sparsek_options,
                                 upcast)

pytestmark = pytest.mark.gpu
GRAD_FACTOR = 4.0

# (B, T, S, N, K, D, k_select, window, causal)
CONFIGS = {
    "causal": (2, 256, 256, 4, 4, 64, 32, 32, True),
    "gqa-ragged": (1, 300, 300, 8, 2, 128, 40, 24, True),
    "t-lt-s": (1, 100, 333, 4, 1, 64, 48, 16, True),
    "t-gt-s": (1, 200, 120, 4, 2, 128, 16, 8, True),
    "window0": (1, 192, 192, 2, 2, 64, 24, 0, True),
    "k-covers": (1, 130, 130, 2, 1, 64, 200, 16, True),
    "noncausal": (2, 160, 200, 4, 2, 64, 30, 12, False),
    "noncausal-window0": (1, 160, 200, 2, 1, 64, 30, 0, False),
    "decode": (2, 1, 1500, 8, 2, 128, 64, 32, True),
    "decode-few": (1, 5, 2048, 4, 4, 64, 100, 64, True),
    # The selection's prefix-sum path (queries at most 64 candidates apart) on a long row, at
    # its edge (65 causal queries), and just past it (66: the wavelet matrix).
    "decode-long": (1, 1, 40000, 4, 2, 64, 300, 64, True),
    "prefix-edge": (1, 65, 3000, 2, 1, 64, 200, 32, True),
    "wavelet-edge": (1, 66, 3000, 2, 1, 64, 200, 32, True),
    # Several window chunks and several list chunks per 128-query tile in the forward.
    "many-chunks": (1, 700, 700, 4, 2, 128, 200, 160, True),
    "noncausal-wide": (1, 300, 400, 2, 1, 64, 150, 100, False),
    # A 128-query tile with no key at all (causal, T >= S + 128), and non-causal T > S.
    "empty-tiles": (1, 400, 100, 2, 1, 64, 16, 8, True),
    "noncausal-t-gt-s": (1, 300, 120, 2, 1, 64, 20, 16, False),
}
# Selection only: 4096, 2048 and 1024 tile lists (B * K * tiles of 128 queries), which the list
# kernel builds with 1, 2 and 4 warps each (the configs above, with fewer lists: 8).
LIST_CONFIGS = {"lists-4096": (2, 8192, 8192, 32, 32, 64, 64, 64, True),
                "lists-2048": (2, 8192, 8192, 16, 16, 64, 64, 64, True),
                "lists-1024": (2, 4096, 4096, 16, 16, 64, 64, 64, True)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tied", [False, True])
def test_selection_matches_cpu(name, tied):
    config = CONFIGS[name]
    T, opts = config[1], sparsek_options(config)
    scores = sparsek_inputs(config, dtype=jnp.bfloat16, seed=3, tied_scores=tied)[3]
    tau, kth = sparsek_ffi.select(scores, num_queries=T, platform="cuda", **opts)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        tau_cpu, kth_cpu = sparsek_ffi.select(jax.device_put(scores, cpu), num_queries=T, **opts)
    np.testing.assert_array_equal(np.asarray(kth), np.asarray(kth_cpu))
    tau, tau_cpu = np.asarray(tau), np.asarray(tau_cpu)
    np.testing.assert_array_equal(np.isfinite(tau), np.isfinite(tau_cpu))
    finite = np.isfinite(tau_cpu)
    np.testing.assert_allclose(tau[finite], tau_cpu[finite], rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["causal", "t-lt-s", "noncausal", "decode-few", "decode-long",
                                  *LIST_CONFIGS])
@pytest.mark.parametrize("tied", [False, True])
def test_key_ranks_and_tile_lists(name, tied):
    """key_rank (read by the forward's selection test) ranks each row's keys by ascending
    (score, index), -0 and +0 equal; each tile list holds, ascending, the keys before the tile's
    last query's candidate end that rank at or above its first query's kth (all of them when
    that kth is -1)."""
    config = LIST_CONFIGS.get(name) or CONFIGS[name]
    T, opts = config[1], sparsek_options(config)
    scores = np.array(sparsek_inputs(config, dtype=jnp.bfloat16, seed=5, tied_scores=tied)[3])
    if tied:
        scores[:, ::7] = -0.0  # signed zeros among the ties
        scores[:, 3::7] = 0.0
    B, S, K = scores.shape
    _, kth, tile_keys, tile_count, key_rank = jax.jit(
        lambda s: sparsek_ffi._select_call_cuda(s, T, opts["k_select"], opts["window"],
                                                opts["causal"]))(jnp.asarray(scores))
    kth, key_rank, tile_keys, tile_count = map(np.asarray, (kth, key_rank, tile_keys, tile_count))
    window, causal = opts["window"], opts["causal"]

    def num_candidates(i):  # NumCandidates of select_algo.cuh
        return S if not causal else int(np.clip(i + S - T - window + 1, 0, S))

    for b in range(B):
        for h in range(K):
            order = np.lexsort((np.arange(S), scores[b, :, h]))  # ascending score, then index
            expected = np.empty(S, np.int32)
            expected[order] = np.arange(S)
            np.testing.assert_array_equal(key_rank[b, h], expected)
            for t in range(tile_keys.shape[2]):
                tile = _ffi.extension().sparsek_tile_queries
                first, last = tile * t, min(tile * t + tile, T) - 1
                first_kth = kth[b, h, first]
                keys = np.arange(num_candidates(last))
                if first_kth >= 0:
                    keys = keys[expected[keys] >= expected[first_kth]]
                listed = tile_keys[b, h, t, :tile_count[b, h, t]]
                np.testing.assert_array_equal(listed, keys, err_msg=f"list {b} {h} {t}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_values_and_gradients_match_reference(name, dtype):
    config = CONFIGS[name]
    opts = sparsek_options(config)
    q, k, v, scores = sparsek_inputs(config, dtype=dtype, seed=11)
    do = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32), dtype)

    def value_and_grads(fn, q, k, v, scores, do):
        o, vjp = jax.vjp(fn, q, k, v, scores)
        return (o, *vjp(do))

    ours = lambda q, k, v, s: sparsek_attention(q, k, v, s, implementation="ffi", **opts)
    ref = lambda q, k, v, s: sparsek_reference.sparsek_attention_dense(
        q, k, v, s, scale=1.0 / np.sqrt(q.shape[-1]), **opts)
    got = jax.jit(lambda *xs: value_and_grads(ours, *xs))(q, k, v, scores, do)
    want = jax.jit(lambda *xs: value_and_grads(ref, *xs))(*upcast(q, k, v), scores, upcast(do)[0])
    for what, g, w in zip(("o", "dq", "dk", "dv", "dscores"), got, want):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), what
        if what == "dscores" and float(jnp.linalg.norm(w)) < 1e-6:  # no soft gate anywhere
            np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-4, err_msg=what)
            continue
        assert_close(g, w, dtype, factor=1.0 if what == "o" else GRAD_FACTOR, what=what)


def test_lowers_to_the_cuda_targets():
    config = CONFIGS["causal"]
    q, k, v, scores = sparsek_inputs(config, dtype=jnp.bfloat16, seed=0)
    fwd = lambda q, k, v, s: sparsek_attention(q, k, v, s, **sparsek_options(config))
    for target in (sparsek_ffi.CUDA_SELECT_TARGET, sparsek_ffi.CUDA_FWD_TARGET):
        assert_custom_call(fwd, q, k, v, scores, target=target)
    grad = jax.grad(lambda *xs: fwd(*xs).astype(jnp.float32).sum(), argnums=(0, 3))
    assert_custom_call(grad, q, k, v, scores, target=sparsek_ffi.CUDA_BWD_TARGET)


def test_float32_and_odd_head_dims_run_the_reference():
    config = (1, 64, 64, 2, 2, 32, 8, 8, True)
    q, k, v, scores = sparsek_inputs(config, dtype=jnp.float32, seed=0)
    o = sparsek_attention(q, k, v, scores, **sparsek_options(config))
    assert o.shape == q.shape
    with pytest.raises(ValueError, match="ffi"):
        sparsek_attention(q, k, v, scores, implementation="ffi", **sparsek_options(config))
