"""Trains the three attention variants on the retrieval task and compares them.

    python -m jax_sparsek.demo [--steps N] [--seq-len L] [--variants dense,window,sparsek]
                               [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_sparsek.demo.model import VARIANTS, ModelConfig, TransformerLM, kv_cache_bytes
from jax_sparsek.demo.task import RetrievalTask


@dataclasses.dataclass
class Settings:
    steps: int
    seq_len: int
    batch_size: int
    window: int
    k_select: int
    learning_rate: float
    eval_every: int
    eval_size: int = 512
    seed: int = 0


def default_settings() -> Settings:
    """Sized for a couple of CPU cores; on an accelerator the sequences are 4x longer (with
    k_select scaled alike: a selection far smaller than the candidates finds the records
    more slowly) and training runs longer."""
    if jax.default_backend() == "cpu":
        return Settings(steps=300, seq_len=256, batch_size=32, window=32, k_select=16,
                        learning_rate=3e-3, eval_every=25)
    return Settings(steps=600, seq_len=1024, batch_size=32, window=64, k_select=64,
                    learning_rate=3e-3, eval_every=50)


class ProgressBar:
    """tqdm when it is installed, else a plain text bar on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.total, self.desc, self.count, self.postfix = total, desc, 0, ""
        self._tqdm = tqdm(total=total, desc=desc, leave=True) if tqdm else None

    def update(self, postfix: str):
        self.count += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(1)
            return
        width = 30
        filled = width * self.count // self.total
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.count}/{self.total} {postfix}")
        if self.count == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()


def masked_loss_and_accuracy(logits, targets, weights):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / total, (correct * weights).sum() / total


@nnx.jit
def train_step(model, optimizer, tokens, targets, weights):
    def loss_fn(model):
        return masked_loss_and_accuracy(model(tokens), targets, weights)

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy


@nnx.jit
def eval_step(model, tokens, targets, weights):
    return masked_loss_and_accuracy(model(tokens), targets, weights)


def evaluate(model, eval_set, batch_size: int = 64):
    """(loss, accuracy) over the scored positions of the whole held-out set."""
    tokens, targets, weights = eval_set
    loss_sum = acc_sum = count = 0.0
    for start in range(0, len(tokens), batch_size):
        sl = slice(start, start + batch_size)
        loss, acc = eval_step(model, tokens[sl], targets[sl], weights[sl])
        n = float(weights[sl].sum())
        loss_sum, acc_sum, count = loss_sum + n * float(loss), acc_sum + n * float(acc), count + n
    return loss_sum / count, acc_sum / count


def make_optimizer(schedule, seq_len: int) -> optax.GradientTransformation:
    """AdamW; the score slope's step is divided by seq_len. Adam moves every parameter by about
    the learning rate per step, and the slope multiplies the position: unscaled, one step
    would shift the last key's score by seq_len times what any other parameter can, and a
    random-walking recency ramp would drown the token part of the score."""

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "slope" if "score_slope" in jax.tree_util.keystr(path) else "rest",
            params)

    return optax.multi_transform(
        {"rest": optax.adamw(schedule, weight_decay=0.01),
         "slope": optax.adam(lambda step: schedule(step) / seq_len)}, label)


def train_variant(variant: str, task: RetrievalTask, model_cfg: ModelConfig, settings: Settings,
                  eval_set) -> dict:
    model = TransformerLM(model_cfg, variant, rngs=nnx.Rngs(settings.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, warmup_steps=max(1, settings.steps // 10),
        decay_steps=settings.steps, end_value=settings.learning_rate / 10)
    optimizer = nnx.Optimizer(model, make_optimizer(schedule, task.seq_len), wrt=nnx.Param)
    rng = np.random.default_rng(settings.seed + 1)  # every variant sees the same batches
    curve = {"step": [], "train_loss": [], "eval_step": [], "eval_accuracy": []}
    step_times = []
    bar = ProgressBar(settings.steps, f"{variant:>8}")
    for step in range(1, settings.steps + 1):
        batch = task.sample(rng, settings.batch_size)
        start = time.perf_counter()
        loss, acc = train_step(model, optimizer, *batch)
        loss = float(loss)  # waits for the step
        step_times.append(time.perf_counter() - start)
        curve["step"].append(step)
        curve["train_loss"].append(loss)
        if step % settings.eval_every == 0 or step == settings.steps:
            eval_loss, eval_acc = evaluate(model, eval_set)
            curve["eval_step"].append(step)
            curve["eval_accuracy"].append(eval_acc)
        bar.update(f"loss {loss:.3f} acc {float(acc):.2f}")
    bar.close()
    return {
        "variant": variant,
        "accuracy": eval_acc,
        "loss": eval_loss,
        # The first steps compile; the median of the rest is the steady state.
        "step_ms": 1e3 * float(np.median(step_times[min(2, len(step_times) - 1):])),
        "keys_per_query": {"dense": task.seq_len, "window": model_cfg.window,
                           "sparsek": model_cfg.window + model_cfg.k_select}[variant],
        "cache_bytes": kv_cache_bytes(model_cfg, variant, task.seq_len),
        "curve": curve,
    }


def format_table(results: Sequence[dict], task: RetrievalTask) -> str:
    header = ("variant", "accuracy", "loss", "step ms", "keys / query", "KV cache / layer / seq")
    rows = [(r["variant"], f"{r['accuracy']:.3f}", f"{r['loss']:.3f}", f"{r['step_ms']:.1f}",
             str(r["keys_per_query"]), f"{r['cache_bytes'] / 1024:.1f} KiB") for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    out.append(f"(chance accuracy {task.chance_accuracy:.3f}; keys / query: the most keys a query "
               f"attends; KV cache: what decoding token {task.seq_len} keeps per layer and "
               "sequence, float32)")
    return "\n".join(out)


def save_plot(results: Sequence[dict], path: str) -> Optional[str]:
    """Writes the learning curves; returns None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the learning-curve plot")
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        c = r["curve"]
        loss = np.asarray(c["train_loss"])
        k = max(1, len(loss) // 30)  # moving average for readability
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax_loss.plot(c["step"][k - 1:], smooth, label=r["variant"])
        ax_acc.plot(c["eval_step"], c["eval_accuracy"], marker=".", label=r["variant"])
    ax_loss.set(xlabel="step", ylabel="train loss (answers)", title="loss")
    ax_acc.set(xlabel="step", ylabel="eval accuracy", title="retrieval accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None):
    defaults = default_settings()
    p = argparse.ArgumentParser(prog="python -m jax_sparsek.demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--window", type=int, default=defaults.window)
    p.add_argument("--k-select", type=int, default=defaults.k_select)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--out", default="demo_out", help="folder for learning_curves.png")
    p.add_argument("--eval-size", type=int, default=defaults.eval_size,
                   help="held-out sequences for the accuracy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}")
    settings = dataclasses.replace(defaults, steps=args.steps, seq_len=args.seq_len,
                                   batch_size=args.batch_size, window=args.window,
                                   k_select=args.k_select, seed=args.seed,
                                   eval_size=args.eval_size,
                                   eval_every=max(1, min(defaults.eval_every, args.steps // 4)))
    return settings, variants, args.out


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    settings, variants, out_dir = parse_args(argv)
    task = RetrievalTask(seq_len=settings.seq_len, window=settings.window)
    model_cfg = ModelConfig(vocab_size=task.vocab_size, window=settings.window,
                            k_select=settings.k_select)
    eval_set = task.sample(np.random.default_rng(12345), settings.eval_size)
    print(f"retrieval task: {task.num_pairs} records beyond a {task.window}-token window in "
          f"{task.seq_len} tokens, {task.num_queries} queries each; backend "
          f"{jax.default_backend()}; {settings.steps} steps of batch {settings.batch_size}")
    start = time.perf_counter()
    results = [train_variant(v, task, model_cfg, settings, eval_set) for v in variants]
    print()
    print(format_table(results, task))
    path = save_plot(results, os.path.join(out_dir, "learning_curves.png"))
    if path:
        print(f"learning curves: {path}")
    print(f"total time {time.perf_counter() - start:.0f} s")
    return results


def cli() -> None:
    """Console entry point (`jax-sparsek-demo`)."""
    main()
