"""SparseKAttention as a Flax layer: shapes, GQA, RoPE, NNX == Linen, transforms, optax,
orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_sparsek
from jax_sparsek.flax import PARAM_NAMES, SparseKAttention, _common
from jax_sparsek.flax import linen as sk_linen
from jax_sparsek.testing import assert_close

E = 32


def make_layer(num_heads=4, num_kv_heads=2, head_dim=8, k_select=4, window=6, seed=0, **kw):
    layer = SparseKAttention(E, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             k_select=k_select, window=window, rngs=nnx.Rngs(seed), **kw)
    # A nonzero slope, so that the position term of the score is exercised too.
    layer.score_slope[...] = jnp.linspace(-0.05, 0.05, layer.config.num_kv_heads)
    return layer


def inputs(B=2, T=24, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, E), jnp.float32)


@pytest.mark.parametrize("num_heads,num_kv_heads,rope", [(4, 4, True), (4, 2, True),
                                                         (4, 1, False)])
def test_shapes_and_param_shapes(num_heads, num_kv_heads, rope):
    layer = make_layer(num_heads, num_kv_heads, rope=rope)
    x = inputs()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    assert layer.k_kernel.shape == (E, num_kv_heads, 8)
    assert layer.q_kernel.shape == (E, num_heads, 8)
    assert layer.score_kernel.shape == (E, num_kv_heads)
    assert layer.score_slope.shape == (num_kv_heads,)


def test_layer_is_projections_around_the_op():
    """The layer's output, rebuilt by hand: projections, RoPE, u = x W_u + slope * position
    and the pure-JAX reference of sparsek_attention."""
    layer = make_layer()
    x = inputs()
    T = x.shape[1]
    pos = jnp.arange(T, dtype=jnp.float32)

    def rope(a):  # rotate-half RoPE, theta = 10000
        half = a.shape[-1] // 2
        freq = 10000.0 ** (-jnp.arange(half) / half)
        ang = pos[:, None] * freq
        c, s = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
        return jnp.concatenate([a[..., :half] * c - a[..., half:] * s,
                                a[..., half:] * c + a[..., :half] * s], -1)

    q = rope(jnp.einsum("bte,end->btnd", x, layer.q_kernel[...]))
    k = rope(jnp.einsum("bte,ekd->btkd", x, layer.k_kernel[...]))
    v = jnp.einsum("bte,ekd->btkd", x, layer.v_kernel[...])
    u = x @ layer.score_kernel[...] + layer.score_slope[...] * pos[:, None]
    o = jax_sparsek.reference.sparsek_attention(q, k, v, u, k_select=4, window=6)
    want = jnp.einsum("btnd,nde->bte", o, layer.out_kernel[...])
    assert_close(layer(x), want, jnp.float32)


def test_rope_depends_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
    pos = jnp.arange(5)

    def logits(shift):
        qr = _common.apply_rope(q, pos + shift, 10000.0)
        kr = _common.apply_rope(k, pos + shift, 10000.0)
        return jnp.einsum("bihd,bjhd->bhij", qr, kr)

    np.testing.assert_allclose(logits(0), logits(37), rtol=1e-4, atol=1e-4)
    with_rope = make_layer(rope=True)
    without = make_layer(rope=False)
    assert not np.allclose(with_rope(inputs()), without(inputs()))


def test_nnx_and_linen_agree():
    x = inputs()
    module = sk_linen.SparseKAttention(num_heads=4, num_kv_heads=2, head_dim=8, k_select=4,
                                       window=6)
    variables = module.init(jax.random.key(3), x)
    assert set(variables["params"]) == set(PARAM_NAMES)
    layer = make_layer()
    # Linen -> NNX
    sk_linen.params_to_nnx(layer, variables["params"])
    np.testing.assert_allclose(layer(x), module.apply(variables, x), rtol=1e-6, atol=1e-6)
    # NNX -> Linen
    other = make_layer(seed=7)
    params = sk_linen.params_from_nnx(other)
    np.testing.assert_allclose(other(x), module.apply({"params": params}, x),
                               rtol=1e-6, atol=1e-6)


def test_jit_grad_and_nnx_jit():
    layer = make_layer()
    x = inputs()
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
        return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

    grads = jax.jit(jax.grad(loss))(params, x)
    for name in PARAM_NAMES:
        g = np.asarray(getattr(grads, name)[...])
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), f"no gradient reaches {name}"
    np.testing.assert_allclose(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x),
                               layer(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), layer(x),
                               rtol=1e-6, atol=1e-6)


def test_optax_steps_lower_the_loss():
    layer = make_layer()
    x = inputs()
    target = jnp.roll(x, 1, axis=1)  # something the layer can fit a little
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_orbax_checkpoint_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    layer = make_layer(seed=11)
    x = inputs()
    state = nnx.state(layer, nnx.Param)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "params", state)
    checkpointer.wait_until_finished()

    fresh = make_layer(seed=12)
    assert not np.allclose(fresh(x), layer(x))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh, nnx.Param))
    restored = checkpointer.restore(tmp_path / "params", abstract)
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(fresh(x), layer(x))


def test_bfloat16_compute():
    layer = make_layer(dtype=jnp.bfloat16)
    x = inputs()
    y = layer(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert_close(y, make_layer()(x), jnp.bfloat16, factor=3)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        make_layer(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="even head_dim"):
        make_layer(head_dim=7)
    with pytest.raises(ValueError, match="window"):
        make_layer(window=0)
    with pytest.raises(ValueError, match="features=32"):
        make_layer()(jnp.zeros((1, 4, 16)))
