"""The demo's retrieval task and a tiny end-to-end run (no accuracy or timing asserted)."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_sparsek.demo import run
from jax_sparsek.demo.model import ModelConfig, TransformerLM, kv_cache_bytes
from jax_sparsek.demo.task import RetrievalTask


def test_task_places_records_beyond_the_window_and_answers_match():
    task = RetrievalTask(seq_len=96, window=16)
    tokens, targets, weights = task.sample(np.random.default_rng(0), 64)
    B, L = tokens.shape
    assert tokens.shape == targets.shape == weights.shape == (64, 96)
    assert tokens.min() >= 0 and max(tokens.max(), targets.max()) < task.vocab_size
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])  # next-token targets
    query_pos = task.query_positions()
    assert query_pos[-1] == L - 1
    np.testing.assert_array_equal(np.nonzero(weights[0])[0], query_pos)

    n_records = task.num_keys * task.num_values
    is_record = (tokens >= task.first_record) & (tokens < task.first_record + n_records)
    for b in range(B):
        record_pos = np.nonzero(is_record[b])[0]
        assert len(record_pos) == task.num_pairs
        # Out of reach of a window-only model: every record precedes every query's window.
        assert record_pos.max() <= query_pos[0] - task.window
        record = tokens[b, record_pos] - task.first_record
        keys, values = record // task.num_values, record % task.num_values
        assert len(set(keys)) == task.num_pairs
        lookup = dict(zip(keys, values))
        for p in query_pos:
            key = tokens[b, p] - task.first_query
            assert 0 <= key < task.num_keys
            assert targets[b, p] - task.first_answer == lookup[key]
        # Nothing but filler and the query block outside the records.
        others = np.delete(tokens[b, :query_pos[0]], record_pos)
        assert others.max() < task.num_filler


def test_task_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="longer"):
        RetrievalTask(seq_len=24, window=16)


@pytest.mark.parametrize("variant", ["dense", "window", "sparsek"])
def test_model_variants(variant):
    cfg = ModelConfig(vocab_size=40, d_model=16, num_heads=2, num_kv_heads=1, window=4,
                      k_select=2, num_layers=1)
    model = TransformerLM(cfg, variant, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((2, 12), jnp.int32))
    assert logits.shape == (2, 12, 40)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert kv_cache_bytes(cfg, variant, 12) > 0


def test_tiny_demo_run_prints_table_and_saves_plot(tmp_path, capsys):
    results = run.main(["--steps", "2", "--seq-len", "48", "--window", "8", "--k-select", "4",
                        "--batch-size", "4", "--eval-size", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r["variant"] for r in results] == ["dense", "window", "sparsek"]
    for variant in ("dense", "window", "sparsek"):
        assert f"| {variant}" in out
    assert "accuracy" in out and "KV cache" in out
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run.save_plot([], str(tmp_path / "curves.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


def test_cli_rejects_unknown_variants():
    with pytest.raises(SystemExit):
        run.parse_args(["--variants", "dense,nope"])


def test_text_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = run.ProgressBar(4, "demo")
    for _ in range(4):
        bar.update("loss 1.0")
    bar.close()
    err = capsys.readouterr().err
    assert "demo [" in err and "4/4 loss 1.0" in err and err.endswith("\n")
