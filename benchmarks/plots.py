"""python -m benchmarks.plots [DEVICE_DIR ...]: PNGs from the JSON records of
benchmarks/results/<device>/ (every device folder without arguments), written to
<device>/plots/:

- throughput.png: forward TF/s vs sequence length per impl (the `long*k` presets);
- speedup_density.png: ours over the best dense peer vs block density (`bsdensity*`);
- speedup_kselect.png: ours over the best dense peer vs k_select, one line per window and
  SparseK shape (`sparsek-<shape>-k*-w*`).

A plot whose records are missing is skipped with one line, every plot when matplotlib is not
importable. Scaled-down presets (`long8k-div16`) plot like the full ones: only the name's
prefix is matched.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

from benchmarks.report import OURS, RESULTS

LONG = re.compile(r"^long(\d+)k")
DENSITY = re.compile(r"^bsdensity(\d+)")
SPARSEK = re.compile(r"^sparsek-(\w+)-k(\d+)-w(\d+)")


def load(device_dir: Path) -> list[dict]:
    return [r for path in sorted(Path(device_dir).glob("*.json")) for r in json.loads(path.read_text())]


def speedups(records: list[dict], pattern: re.Pattern, passes: str = "fwd") -> dict[str, float]:
    """{preset: best dense peer ms / our ms} for the presets matching `pattern` that have both
    rows. Dense peers are the rows of op flash_attention by another impl (the stand-ins of
    the sparse presets), not our reference nor Flex on the exact keep-set."""
    ours, dense = {}, {}
    for r in records:
        if r["pass"] != passes or not pattern.match(r["preset"]):
            continue
        if r["impl"] == OURS:
            ours[r["preset"]] = r["ms"]
        elif r["op"] == "flash_attention":
            dense[r["preset"]] = min(dense.get(r["preset"], float("inf")), r["ms"])
    return {p: dense[p] / ms for p, ms in ours.items() if p in dense}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput(records: list[dict], out: Path):
    rows = [r for r in records if r["pass"] == "fwd" and LONG.match(r["preset"])]
    if not rows:
        return None
    plt, fig, ax = _figure()
    for impl in sorted({r["impl"] for r in rows}, key=lambda i: (i != OURS, i)):
        pts = sorted((r["T"], r["tflops"]) for r in rows if r["impl"] == impl)
        ax.plot(*zip(*pts), marker="o", label=impl, lw=2.5 if impl == OURS else 1.2)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["T"] for r in rows})
    ax.set_xticks(lengths, [f"{t // 1024}k" if t >= 1024 else str(t) for t in lengths])
    ax.set_xlabel("sequence length T = S")
    ax.set_ylabel("forward TF/s")
    return _save(plt, fig, ax, out / "throughput.png",
                 f"{rows[0]['device']}: causal dense attention, B{rows[0]['B']} H{rows[0]['N']} "
                 f"D{rows[0]['D']} {rows[0]['dtype']}")


def _speedup_axes(ax, xlabel: str):
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best dense peer ms / ours (fwd)")


def plot_speedup_density(records: list[dict], out: Path):
    ratio = speedups(records, DENSITY)
    if not ratio:
        return None
    plt, fig, ax = _figure()
    pts = sorted((int(DENSITY.match(p).group(1)), x) for p, x in ratio.items())
    ax.plot(*zip(*pts), marker="o", label="block-sparse (ours)")
    _speedup_axes(ax, "blocks on (%)")
    return _save(plt, fig, ax, out / "speedup_density.png",
                 f"{records[0]['device']}: block-sparse vs dense, 128x128 blocks")


def plot_speedup_kselect(records: list[dict], out: Path):
    ratio = speedups(records, SPARSEK)
    if not ratio:
        return None
    plt, fig, ax = _figure()
    lines: dict[tuple, list] = {}
    for preset, x in ratio.items():
        shape, k, w = SPARSEK.match(preset).groups()
        lines.setdefault((shape, int(w)), []).append((int(k), x))
    for (shape, w), pts in sorted(lines.items()):
        ax.plot(*zip(*sorted(pts)), marker="o", label=f"{shape}, window {w}")
    ax.set_xscale("log", base=2)
    ks = sorted({k for pts in lines.values() for k, _ in pts})
    ax.set_xticks(ks, [str(k) for k in ks])
    _speedup_axes(ax, "k_select")
    return _save(plt, fig, ax, out / "speedup_kselect.png",
                 f"{records[0]['device']}: SparseK vs best dense (causal, or a window of as many keys)")


def write_plots(device_dir: Path) -> list[Path]:
    """Every plot whose records exist in `device_dir`; one line per plot written or skipped."""
    device_dir = Path(device_dir)
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        print(f"skip plots of {device_dir}: matplotlib is not importable (pip install matplotlib)")
        return []
    records, out, written = load(device_dir), device_dir / "plots", []
    for plot, needs in ((plot_throughput, "long*k"), (plot_speedup_density, "bsdensity*"),
                        (plot_speedup_kselect, "sparsek-*-k*-w*")):
        path = plot(records, out)
        if path is None:
            print(f"skip {plot.__name__[5:]}: no {needs} records (ours and a dense peer) "
                  f"in {device_dir}")
        else:
            print(f"wrote {path}")
            written.append(path)
    return written


def main(argv=None) -> None:
    dirs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    for device_dir in dirs or sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        write_plots(device_dir)


if __name__ == "__main__":
    main()
