"""Weak scaling over the GPUs of one host: `python -m benchmarks.scaling`.

Per device the work stays fixed (one batch slice per device, batch-sharded over a 1-D mesh of
the first n devices, n = 1, 2, 4, ...): sparsek_attention and flash_attention forward+backward,
and one training step of the demo model. Efficiency = (time on 1 device) / (time on n), i.e.
per-device throughput relative to one device (the target is >= 0.9). Records go to
benchmarks/results/<device>/<date>-weak-scaling.json. On a CPU host, run it with
XLA_FLAGS=--xla_force_host_platform_device_count=8 to exercise the code (not to measure).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_sparsek as jsk
from benchmarks import report, runner, timing
from jax_sparsek.demo.model import ModelConfig, TransformerLM


def _attention_step(op: str, shape: dict):
    """(fwd+bwd function of the arrays, arrays on the host) for one device's slice."""
    rng = np.random.default_rng(0)
    b, t, n, k, d = shape["B"], shape["T"], shape["N"], shape["K"], shape["D"]
    dt = jnp.dtype(shape["dtype"])
    arrays = [rng.standard_normal(s, np.float32).astype(dt)
              for s in ((b, t, n, d), (b, t, k, d), (b, t, k, d))]
    if op == "sparsek_attention":
        arrays.append(rng.standard_normal((b, t, k), np.float32))
        fn = lambda q, k, v, s: jsk.sparsek_attention(q, k, v, s, k_select=shape["k_select"],
                                                     window=shape["window"])
    else:
        fn = lambda q, k, v: jsk.flash_attention(q, k, v, causal=True)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    return jax.grad(loss, argnums=tuple(range(len(arrays)))), arrays


def _train_step(variant: str, shape: dict):
    cfg = ModelConfig(vocab_size=64, d_model=shape["d_model"], window=shape["window"],
                      k_select=shape["k_select"])
    model = TransformerLM(cfg, variant, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    graph, state = nnx.split((model, optimizer))

    def step(state, tokens):
        model, optimizer = nnx.merge(graph, state)
        logits_loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(
            m(tokens[:, :-1]), tokens[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(logits_loss)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    tokens = np.random.default_rng(0).integers(0, 64, (shape["B"], shape["T"] + 1), np.int32)
    return step, state, tokens


def run(shape: dict, workloads, iters: int):
    env = runner.environment()
    counts = [n for n in (1, 2, 4, 8, 16) if n <= jax.device_count()]
    records, base = [], {}
    for name in workloads:
        for n in counts:
            mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,),
                                 devices=jax.devices()[:n])
            batch = lambda x: jax.device_put(
                np.concatenate([x] * n), NamedSharding(mesh, P("data")))
            if name.startswith("train:"):
                step, state, tokens = _train_step(name.split(":")[1], shape)
                state = jax.device_put(state, NamedSharding(mesh, P()))
                call = jax.jit(step)
                args = (state, batch(tokens))
            else:
                call_fn, arrays = _attention_step(name, shape)
                call, args = jax.jit(call_fn), tuple(batch(a) for a in arrays)
            ms, _ = timing.median_ms(lambda: call(*args), jax.block_until_ready, iters)
            base.setdefault(name, ms)
            records.append({"preset": "weak-scaling", "workload": name, "devices": n,
                            "per_device_batch": shape["B"], "T": shape["T"], "ms": ms,
                            "efficiency": base[name] / ms, **env})
            print(f"{name:24s} x{n:<2d} {ms:9.3f} ms  efficiency {base[name] / ms:.2f}",
                  flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=2, help="batch per device")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--k-select", type=int, default=1024)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--workloads", nargs="+", default=[
        "sparsek_attention", "flash_attention", "train:sparsek", "train:dense"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    shape = dict(B=a.B, T=a.T, N=a.N, K=a.K, D=a.D, dtype=a.dtype, k_select=a.k_select,
                 window=a.window, d_model=a.d_model)
    records = run(shape, a.workloads, a.iters)
    if not a.no_save:
        rec0 = records[0]
        path = (report.RESULTS / report.device_slug(rec0["device"])
                / f"{rec0['date']}-weak-scaling.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1) + "\n")
        print("wrote", path)
    return records


if __name__ == "__main__":
    main()
