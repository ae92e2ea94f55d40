"""Smoke tests of the benchmark harness on CPU at tiny sizes: records, files, references,
masks and slicing (no timing is asserted)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as cli
from benchmarks import problems, report, runner
from jax_sparsek.testing import AttentionSpec


# Jitted: eagerly, each of the mask's small ops would compile on its own.
keep_mask = jax.jit(problems.keep_mask, static_argnums=0)


def _inputs(spec, seed):
    """Random inputs made with numpy (the spec's own jax.random ones compile per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {"q": normal(spec.B, spec.T, spec.N, spec.D), "k": normal(spec.B, spec.s, spec.k, spec.D),
            "v": normal(spec.B, spec.s, spec.k, spec.dv), "scores": 2 * normal(spec.B, spec.s, spec.k)}


def _check_records(records, max_err):
    assert records
    for r in records:
        assert tuple(r) == runner.FIELDS
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and math.isfinite(r["gbps"])
        assert r["rel_err"] is not None and 0 <= r["rel_err"] < max_err, r


def test_cli_run_writes_records(tmp_path, capsys):
    argv = ["--preset", "seed000", "--scale-down", "16", "--dtype", "fp32", "--iters", "3",
            "--out", str(tmp_path)]
    records = cli.main(argv)
    _check_records(records, 1e-4)
    assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
    assert {r["preset"] for r in records} == {"seed000-dtypefp32-div16"}
    assert {"jax_sparsek", "jax_sparsek[xla]", "jax.nn[xla]"} <= {r["impl"] for r in records}
    (path,) = tmp_path.glob("*/*.json")
    assert path.name == f"{records[0]['date']}-seed000-dtypefp32-div16.json"
    assert json.loads(path.read_text()) == records
    out = capsys.readouterr().out
    assert "t/best peer" in out and "jax.nn[xla]" in out

    # A later run of one pass replaces that pass's rows and keeps the others.
    again = [dict(r, ms=r["ms"] + 1) for r in records if r["pass"] == "fwd"]
    report.save(again, tmp_path)
    saved = json.loads(path.read_text())
    assert len(saved) == len(records)
    assert [r for r in saved if r["pass"] == "fwd"] == again


def test_sparse_preset_rows():
    sparsek = problems.scale_down(cli.PRESETS["sparsek-seed003"], 64).replace(dtype="float32")
    blocks = problems.scale_down(cli.PRESETS["blocksparse80"], 32).replace(dtype="float32")
    records = runner.run({"tiny-sparsek": sparsek, "tiny-blocks": blocks}, passes=("fwd",), iters=2)
    _check_records(records, 1e-4)
    rows = {(r["preset"], r["impl"]): r for r in records}
    assert {"jax_sparsek", "jax_sparsek[xla]", "jax.nn[xla]"} == {i for _, i in rows}
    # A dense peer reports the dense problem it ran; ours reports the preset's op.
    dense = rows["tiny-sparsek", "jax.nn[xla]"]
    assert dense["op"] == "flash_attention" and dense["k_select"] is None and dense["causal"]
    ours = rows["tiny-sparsek", "jax_sparsek"]
    assert ours["op"] == "sparsek_attention" and ours["window"] == sparsek.sparsek_window
    assert rows["tiny-blocks", "jax_sparsek"]["op"] == "block_sparse_attention"
    assert rows["tiny-blocks", "jax.nn[xla]"]["op"] == "flash_attention"


def test_problem_specs_from_flags():
    specs = cli.problem_specs(cli.parse_args(["--preset", "seed003", "--T", "256", "--scale-down", "2"]))
    (name, spec), = specs.items()
    assert name == "seed003-T256-div2"
    assert (spec.B, spec.T, spec.N, spec.D, spec.causal) == (8, 128, 48, 128, True)
    specs = cli.problem_specs(cli.parse_args(["--T", "64", "--N", "4", "--K", "2", "--window", "8,0"]))
    (name, spec), = specs.items()
    assert name.startswith("custom-") and spec.window == (8, 0) and spec.k == 2
    spec = problems.scale_down(cli.PRESETS["blocksparse80"], 16)
    assert spec.block_size == (16, 16) and spec.T == 1024


def test_flash_keep_mask_matches_jax_nn():
    spec = AttentionSpec(B=1, T=40, N=4, K=2, D=16, causal=True, window=(7, 0))
    a = _inputs(spec, 1)
    ours = jax.jit(lambda a: problems.masked_attention_f32(
        a["q"], a["k"], a["v"], problems.keep_mask(problems.Target(spec), a), problems.scale(spec)))(a)
    ref = jax.jit(lambda a: jax.nn.dot_product_attention(
        a["q"], a["k"], a["v"], is_causal=True, local_window_size=(7, 0), implementation="xla"))(a)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_empty_block_row_gives_zeros():
    spec = AttentionSpec(B=1, T=32, N=2, D=8, block_size=(16, 16))
    a = _inputs(spec, 2)
    a["block_mask"] = jnp.ones((1, 2, 2, 2), bool).at[:, :, 1].set(False)
    o = jax.jit(lambda a: problems.masked_attention_f32(
        a["q"], a["k"], a["v"], problems.keep_mask(problems.Target(spec), a), problems.scale(spec)))(a)
    assert bool(jnp.all(o[:, 16:] == 0)) and bool(jnp.all(jnp.isfinite(o)))


@pytest.mark.parametrize("causal", [True, False])
def test_sparsek_selection_mask_brute_force(causal):
    k_sel, w = 5, 3
    spec = AttentionSpec(B=2, T=24, S=32, N=4, K=2, D=8, causal=causal, k_select=k_sel,
                         sparsek_window=w)
    a = _inputs(spec, 3)
    keep = np.asarray(keep_mask(problems.Target(spec, hard_selection=True), a))
    u = np.asarray(a["scores"])
    want = np.zeros((2, 4, 24, 32), bool)
    for b in range(2):
        for h in range(4):
            for i in range(24):
                p = i + 32 - 24
                cand = np.arange(32) if not causal else np.arange(max(0, p - w + 1))
                top = cand[np.argsort(-u[b, cand, h // 2])[:k_sel]]
                want[b, h, i, top] = True
                lo, hi = (p - w + 1, p) if causal else (p - w + 1, p + w - 1)
                want[b, h, i, max(0, lo):hi + 1] = True
    np.testing.assert_array_equal(keep, want)


def test_reference_on_a_slice_is_the_slice_of_the_reference():
    # Batch and kv-head groups are independent: dk, dv of a kv head sum over its query heads.
    spec = AttentionSpec(B=2, T=16, N=4, K=2, D=8, causal=True, k_select=3, sparsek_window=2)
    a = _inputs(spec, 4)  # numpy: its slices compile nothing
    do = np.random.default_rng(9).standard_normal((2, 16, 4, 8)).astype(np.float32)
    target = problems.Target(spec, hard_selection=True)
    o, grads = problems.reference(target, a, do, ("q", "k", "v"))
    batch, kv_heads = problems.reference_slice(spec, budget=1)
    assert (batch, kv_heads) == (1, 1)
    part = problems.slice_arrays({**a, "do": do}, spec, batch, kv_heads)
    o1, grads1 = problems.reference(target, part, part.pop("do"), ("q", "k", "v"))
    full = problems.slice_arrays({"o": o, **grads}, spec, batch, kv_heads)
    np.testing.assert_allclose(o1, full["o"], rtol=1e-5, atol=1e-6)
    for n in ("q", "k", "v"):
        np.testing.assert_allclose(grads1[n], full[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,hard", [
    (AttentionSpec(B=1, T=300, S=340, N=2, D=8, causal=True, k_select=20, sparsek_window=16), False),
    (AttentionSpec(B=1, T=300, S=340, N=2, D=8, causal=True, k_select=20, sparsek_window=16), True),
    (AttentionSpec(B=1, T=300, S=340, N=2, D=8, causal=True), False),
])
def test_reference_in_query_blocks_is_the_whole_reference(spec, hard):
    # A small budget splits the queries into blocks: the forward keeps the last block's rows,
    # the backward sums k, v (and scores) gradients over the blocks.
    a = _inputs(spec, 6)
    do = np.random.default_rng(2).standard_normal((1, 300, 2, 8)).astype(np.float32)
    target = problems.Target(spec, hard_selection=hard)
    grad_args = ("q", "k", "v", "scores") if spec.k_select else ("q", "k", "v")
    budget = 2 * 340 * 2 * 80  # about 80 queries a block
    assert len(problems.query_blocks(target, 1, spec.k, True, budget)) > 1
    o, grads = problems.reference(target, a, do, grad_args)
    o_blocked, grads_blocked = problems.reference(target, a, do, grad_args, budget=budget)
    np.testing.assert_allclose(o_blocked, o, rtol=1e-5, atol=1e-6)
    for n in grads:
        np.testing.assert_allclose(grads_blocked[n], grads[n], rtol=1e-5, atol=1e-6, err_msg=n)
    o_last, _ = problems.reference(target, a, None, grad_args, budget=budget)
    np.testing.assert_allclose(o_last, o[:, 300 - o_last.shape[1]:], rtol=1e-5, atol=1e-6)
    assert o_last.shape[1] < 300


def test_table_ratio_to_best_peer():
    env = {"device": "cpu", "jax": "0", "date": "2026-01-01", "commit": None}
    target = problems.Target(AttentionSpec(B=1, T=8, N=1, D=8))
    recs = [runner.record("p", target, impl, "fwd", ms, 1e-3, env)
            for impl, ms in (("jax_sparsek", 1.0), ("jax.nn[xla]", 4.0), ("torch.flex", 2.0),
                             (report.DETERMINISTIC, 0.5))]  # ours: no peer
    lines = report.table(recs).splitlines()
    assert lines[2].split()[-2] == "0.50" and lines[3].split()[-2] == "2.00"
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
