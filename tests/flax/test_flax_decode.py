"""Decoding with the bounded cache reproduces the full causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_sparsek.flax import SparseKAttention, SparseKCache
from jax_sparsek.flax import linen as sk_linen

E = 32
K_SELECT, WINDOW = 4, 5


def make_layer(cache_slack=None, score_gain=4.0, seed=0):
    layer = SparseKAttention(E, 4, num_kv_heads=2, head_dim=8, k_select=K_SELECT,
                             window=WINDOW, cache_slack=cache_slack, rngs=nnx.Rngs(seed))
    # Scores spread over several units (as a trained score projection gives) and a position
    # term: the soft top-k then has a real fractional support, and few candidates sit
    # within 1 of tau, the regime where the default buffer is exact.
    layer.score_kernel[...] = score_gain * layer.score_kernel[...]
    layer.score_slope[...] = jnp.array([0.03, -0.02])
    return layer


def tokens(T, B=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, E), jnp.float32)


def max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def decode_loop(layer, x, cache):
    step = nnx.jit(lambda layer, x_t, cache: layer.decode_step(x_t, cache))
    ys = []
    for t in range(x.shape[1]):
        y_t, cache = step(layer, x[:, t], cache)
        ys.append(y_t)
    return jnp.stack(ys, axis=1), cache


def test_decode_steps_match_full_forward_past_the_cache_rows():
    layer = make_layer()
    cache = layer.init_cache(batch_size=2)
    rows = WINDOW + K_SELECT + layer.config.candidate_capacity  # everything the cache holds
    T = 3 * rows
    x = tokens(T)
    y_steps, cache = decode_loop(layer, x, cache)
    assert int(cache.pos) == T
    assert not bool(cache.overflowed.any())
    assert max_rel(y_steps, layer(x)) < 1e-5


def test_cache_size_does_not_grow():
    layer = make_layer()
    empty = layer.init_cache(batch_size=2)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), empty)
    for T in (3, 40):
        _, cache = layer.decode(tokens(T), layer.init_cache(batch_size=2))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes
        assert cache.num_bytes() == empty.num_bytes()
    cfg = layer.config
    assert empty.select_k.shape == (2, 2, K_SELECT, 8)
    assert empty.window_k.shape == (2, 2, WINDOW, 8)
    assert empty.cand_score.shape == (2, 2, cfg.candidate_capacity)


def test_scan_decode_and_prefill_match_full_forward():
    layer = make_layer()
    x = tokens(40)
    y_full = layer(x)
    y_scan, scanned = jax.jit(lambda x, c: layer.decode(x, c))(x, layer.init_cache(2))
    assert max_rel(y_scan, y_full) < 1e-5
    for split in (3, 17):  # prompt shorter and longer than window + k_select
        y_prompt, cache = jax.jit(layer.prefill)(x[:, :split])
        y_rest, cache = jax.jit(layer.decode)(x[:, split:], cache)
        assert max_rel(jnp.concatenate([y_prompt, y_rest], axis=1), y_full) < 1e-5
        np.testing.assert_array_equal(np.sort(cache.select_pos, -1),
                                      np.sort(scanned.select_pos, -1))
        np.testing.assert_allclose(cache.tau, scanned.tau, rtol=1e-6)


def test_linen_cache_collection_decoding():
    module = sk_linen.SparseKAttention(num_heads=4, num_kv_heads=2, head_dim=8,
                                       k_select=K_SELECT, window=WINDOW)
    x = tokens(30)
    params = sk_linen.params_from_nnx(make_layer())
    y_full = module.apply({"params": params}, x)
    cache = module.init(jax.random.key(0), x[:, :1], decode=True)["cache"]
    assert set(cache) == set(SparseKCache.__dataclass_fields__)

    @jax.jit
    def decode(cache, x_chunk):  # the tokens of the chunk are decoded one by one inside
        return module.apply({"params": params, "cache": cache}, x_chunk, decode=True,
                            mutable=["cache"])

    ys = []
    for start in range(0, 30, 10):
        y, updated = decode(cache, x[:, start:start + 10])
        cache = updated["cache"]
        ys.append(y)
    assert max_rel(jnp.concatenate(ys, axis=1), y_full) < 1e-5
    y_prompt, updated = jax.jit(lambda x: module.apply(
        {"params": params}, x, decode=True, prefill=True, mutable=["cache"]))(x[:, :20])
    y_rest, _ = decode(updated["cache"], x[:, 20:])
    assert max_rel(jnp.concatenate([y_prompt, y_rest], axis=1), y_full) < 1e-5


def test_overflow_is_flagged():
    """Scores bunched within 1 of tau overflow a minimal buffer; the cache says so."""
    x = tokens(40)
    small = make_layer(cache_slack=1, score_gain=0.3)
    _, cache = small.decode(x, small.init_cache(2))
    assert bool(cache.overflowed.any())
    large = make_layer(cache_slack=40, score_gain=0.3)  # holds every candidate: exact again
    y, cache = large.decode(x, large.init_cache(2))
    assert not bool(cache.overflowed.any())
    assert max_rel(y, large(x)) < 1e-5


def test_decode_errors():
    layer = SparseKAttention(E, 4, k_select=2, window=3, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal"):
        layer.init_cache(1)
    layer = make_layer()
    with pytest.raises(ValueError, match="one token"):
        layer.decode_step(tokens(2), layer.init_cache(2))
