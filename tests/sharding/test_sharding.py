"""Every FFI op under batch / head sharding on 8 host devices: results equal the unsharded
run, and the compiled programs hold no collective (all-gather, all-to-all, all-reduce).
Also: explicit mesh axes, shard_map, pmap, the Flax layer with head-sharded parameters, and
the warning for sequence sharding.

The device count is fixed when jax starts, so the checks run in one child process."""

import os
import subprocess
import sys
import textwrap

CHECKS = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jax_sparsek as jsk
    from jax_sparsek.testing import assert_close

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    B, T, N, K, D = 8, 48, 8, 4, 16
    q = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32) for _ in range(2))
    scores = jnp.asarray(rng.standard_normal((B, T, K)), jnp.float32)
    mask = jnp.asarray(rng.random((B, K, 6, 6)) < 0.6)

    OPS = {  # name: (function of q, k, v, scores, mask; differentiable argnums)
        "flash": (lambda q, k, v, s, m: jsk.flash_attention(q, k, v, causal=True, window=(9, 0)),
                  (0, 1, 2)),
        "block_sparse": (lambda q, k, v, s, m: jsk.block_sparse_attention(
            q, k, v, m, block_size=(8, 8), causal=True), (0, 1, 2)),
        "sparsek": (lambda q, k, v, s, m: jsk.sparsek_attention(q, k, v, s, k_select=5, window=4),
                    (0, 1, 2, 3)),
    }

    def value_and_grads(fn, argnums):
        loss = lambda *a: jnp.sum(fn(*a) ** 2)
        return lambda *a: (fn(*a), *jax.grad(loss, argnums=argnums)(*a))

    args = (q, k, v, scores, mask)
    expected = {n: jax.jit(value_and_grads(f, a))(*args) for n, (f, a) in OPS.items()}
    COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute")

    def check_sharded(mesh, spec, tag):
        spec = P(*(tuple(spec) + (None,) * (4 - len(spec))))
        specs = (spec, spec, spec, P(*spec[:2], spec[2]), P(spec[0], spec[2]))
        sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
        for name, (fn, argnums) in OPS.items():
            run = jax.jit(value_and_grads(fn, argnums))
            hlo = run.lower(*sharded).compile().as_text()
            found = [c for c in COLLECTIVES if c in hlo]
            assert not found, (tag, name, found)
            got = run(*sharded)
            assert tuple(got[0].sharding.spec)[:3] == tuple(spec)[:3], (tag, name, got[0].sharding.spec)
            for g, w in zip(got, expected[name]):
                assert_close(g, w, "float32", factor=4.0, what=f"{tag} {name}")

    for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
        with jax.set_mesh(mesh):
            check_sharded(mesh, P("data", None, "model"), f"batch+heads {types[0]}")
            check_sharded(mesh, P(("data", "model")), f"batch {types[0]}")
            check_sharded(mesh, P(None, None, "model"), f"heads {types[0]}")

    # shard_map: the ops run on the local blocks.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = P("data", None, "model")
    for name, (fn, _) in OPS.items():
        smap = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P("data", None, "model"),
                                                      P("data", "model")), out_specs=spec)
        sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in
                   zip(args, (spec, spec, spec, P("data", None, "model"), P("data", "model")))]
        assert_close(jax.jit(smap)(*sharded), expected[name][0], "float32", what="shard_map " + name)

    # pmap over the batch.
    for name, (fn, _) in OPS.items():
        split = [x.reshape((8, B // 8) + x.shape[1:]) for x in args]
        got = jax.pmap(fn)(*split).reshape(expected[name][0].shape)
        assert_close(got, expected[name][0], "float32", what="pmap " + name)

    # The Flax layer with head-sharded parameters (tensor parallel over "model") and a
    # batch-sharded input: attention runs shard-locally; only the output projection reduces.
    from flax import nnx
    from jax_sparsek.flax import SparseKAttention
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    layer = SparseKAttention(32, num_heads=8, num_kv_heads=4, k_select=5, window=4,
                             rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)
    x = jnp.asarray(rng.standard_normal((8, 24, 32)), jnp.float32)
    expected_y = nnx.merge(graph, params)(x)
    head_axis = {"q_kernel": 1, "k_kernel": 1, "v_kernel": 1, "out_kernel": 0,
                 "score_kernel": 1, "score_slope": 0}
    def shard_param(path, p):
        name = next(n for n in head_axis if n in jax.tree_util.keystr(path))
        spec = [None] * p.ndim
        spec[head_axis[name]] = "model"
        return jax.device_put(p, NamedSharding(mesh, P(*spec)))
    params = jax.tree_util.tree_map_with_path(shard_param, params)
    run = jax.jit(lambda params, x: nnx.merge(graph, params)(x))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    hlo = run.lower(params, xs).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, "flax layer: gathers"
    assert_close(run(params, xs), expected_y, "float32", what="flax layer sharded")

    # Sequence sharding is not supported: a warning, then the gathered (correct) result.
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(AxisType.Auto,))
    seq = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jax.jit(lambda q, k, v: jsk.flash_attention(q, k, v, causal=True))(*seq)
    assert any("not supported" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert_close(got, jsk.reference.flash_attention(q, k, v, causal=True), "float32")
    print("sharding ok")
""")


def test_ops_shard_over_batch_and_heads_without_collectives(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    # Run outside the source tree so that the child imports the installed package.
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "sharding ok" in done.stdout, done.stderr[-4000:]
