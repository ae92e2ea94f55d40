"""The end-of-run table and the JSON files under benchmarks/results/."""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OURS = "jax_sparsek"
DETERMINISTIC = f"{OURS}[deterministic]"
OUR_KERNELS = (OURS, DETERMINISTIC)  # never a peer (our float32 reference is one)


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _best_peer_ms(records: list[dict]) -> dict:
    best = {}
    for r in records:
        if r["impl"] not in OUR_KERNELS:
            key = (r["device"], r["preset"], r["pass"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    return best


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def table(records: list[dict]) -> str:
    """ms, TF/s, us/head, GB/s, time over the best peer's (same preset and pass; every impl
    but ours is a peer) and rel_err, one row per record."""
    best = _best_peer_ms(records)
    head = ("preset", "impl", "pass", "ms", "TF/s", "us/head", "GB/s", "t/best peer", "rel_err")
    rows = []
    for r in records:
        peer = best.get((r["device"], r["preset"], r["pass"]))
        rows.append((
            r["preset"], r["impl"], r["pass"], f"{r['ms']:.3f}", _num(r["tflops"]),
            _num(r["us_per_head"]), _num(r["gbps"]),
            f"{r['ms'] / peer:.2f}" if peer else "-",
            f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-",
        ))
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(
        str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, width)))
    return "\n".join([line(head), line(["-" * w for w in width])] + [line(r) for r in rows])


def save(records: list[dict], out_dir: Path = RESULTS) -> list[Path]:
    """Writes <out_dir>/<device-slug>/<date>-<preset>.json per preset. Records already in a file
    for another (impl, pass) are kept; the same (impl, pass) is replaced."""
    paths = []
    groups: dict[Path, list[dict]] = {}
    for r in records:
        path = Path(out_dir) / device_slug(r["device"]) / f"{r['date']}-{r['preset']}.json"
        groups.setdefault(path, []).append(r)
    for path, new in groups.items():
        fresh = {(r["impl"], r["pass"]) for r in new}
        old = json.loads(path.read_text()) if path.exists() else []
        kept = [r for r in old if (r.get("impl"), r.get("pass")) not in fresh]
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".json.part")  # a run killed mid-write leaves the file whole
        part.write_text(json.dumps(kept + new, indent=1) + "\n")
        part.replace(path)
        paths.append(path)
    return paths


def markdown(records: list[dict]) -> str:
    """The README's results table: one row per (device, preset, pass, impl), ours first."""
    best = _best_peer_ms(records)
    order = lambda r: (r["device"], r["preset"], r["pass"], r["impl"] != OURS, r["ms"])
    lines = ["| device | preset | pass | impl | ms | TF/s | us/head | ours / best peer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=order):
        ratio = ""
        key = (r["device"], r["preset"], r["pass"])
        if r["impl"] == OURS and key in best:
            ratio = f"{r['ms'] / best[key]:.2f}"
        lines.append(f"| {r['device']} | {r['preset']} | {r['pass']} | {r['impl']} | "
                     f"{r['ms']:.3f} | {_num(r['tflops'])} | {_num(r['us_per_head'])} | {ratio} |")
    return "\n".join(lines)


# The original BlackwellSparseK reports' tiers: forward us/head (time over heads) of the
# headline configs, and the H100 ceilings measured on the device machine (ANCHORS.md).
TIERS = (("<= 3.82", lambda us: us <= 3.82), ("< 3.0", lambda us: us < 3.0),
         ("< 2.0", lambda us: us < 2.0))
HBM_BYTES_PER_S = 2.97e12
TENSOR_FLOPS_PER_S = 795e12


def floors_us_per_head(r: dict) -> tuple[float, float]:
    """(HBM floor, tensor-core floor) of a record in us/head: its bytes (q, k, v read and o
    written once, plus scores / block mask) at 2.97 TB/s and its FLOPs at 795 TF/s, both
    recovered from the record's own rates."""
    seconds = r["ms"] * 1e-3
    bytes_, flops = r["gbps"] * 1e9 * seconds, r["tflops"] * 1e12 * seconds
    return (1e6 * bytes_ / HBM_BYTES_PER_S / r["N"], 1e6 * flops / TENSOR_FLOPS_PER_S / r["N"])


def tier_rows(records: list[dict]) -> list[tuple]:
    """(device, preset, us/head, HBM floor, tensor floor, *pass/fail per tier) of each forward
    record of ours; seed000 and seed003 first, then the other presets by name."""
    ours = [r for r in records if r["impl"] == OURS and r["pass"] == "fwd"]
    order = lambda r: (r["device"], not r["preset"].startswith(("seed000", "seed003")), r["preset"])
    rows = []
    for r in sorted(ours, key=order):
        hbm, tensor = floors_us_per_head(r)
        verdicts = tuple("pass" if ok(r["us_per_head"]) else "fail" for _, ok in TIERS)
        rows.append((r["device"], r["preset"], r["us_per_head"], hbm, tensor) + verdicts)
    return rows


_TIER_HEAD = ("device", "preset", "us/head (fwd)", "HBM floor", "tensor floor",
              *(f"tier {name}" for name, _ in TIERS))


def _tier_cells(row: tuple) -> list[str]:
    return [row[0], row[1], *(f"{x:.3g}" for x in row[2:5]), *row[5:]]


def tier_table(records: list[dict]) -> str:
    """The tier table as plain text ('' without a forward record of ours)."""
    rows = [_tier_cells(r) for r in tier_rows(records)]
    if not rows:
        return ""
    width = [max(len(str(x)) for x in col) for col in zip(_TIER_HEAD, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, width))
    return "\n".join([line(_TIER_HEAD), line(["-" * w for w in width])] + [line(r) for r in rows])


def tier_markdown(records: list[dict]) -> str:
    """The tier table for the README (floors in us/head: bytes at 2.97 TB/s, FLOPs at 795 TF/s)."""
    lines = ["| " + " | ".join(_TIER_HEAD) + " |", "|" + "---|" * len(_TIER_HEAD)]
    lines += ["| " + " | ".join(_tier_cells(r)) + " |" for r in tier_rows(records)]
    return "\n".join(lines)


def decode_markdown(records: list[dict]) -> str:
    """The decoding table: time, bandwidth on the bytes each step must read, its fraction of
    the 2.97 TB/s an elementwise kernel reaches, and ours / best peer."""
    best = _best_peer_ms(records)
    order = lambda r: (r["device"], r["preset"], r["impl"] != OURS, r["ms"])
    lines = ["| device | preset | impl | us | GB/s | of 2.97 TB/s | ours / best peer |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=order):
        key = (r["device"], r["preset"], r["pass"])
        ratio = f"{r['ms'] / best[key]:.2f}" if r["impl"] == OURS and key in best else ""
        lines.append(f"| {r['device']} | {r['preset']} | {r['impl']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['gbps']:.0f} | {r['gbps'] * 1e9 / HBM_BYTES_PER_S:.0%} | {ratio} |")
    return "\n".join(lines)


def update_readme(readme: Path, results: Path = RESULTS) -> None:
    """Rewrites the tables between the README's results markers from the JSON records of the
    BENCHMARKS.md presets: the results, then our forward us/head against the tiers and floors,
    then the decoding presets. The sweeps' records are only counted there (their plots and
    files are named instead)."""
    from benchmarks.presets import GROUPS

    records = [r for path in sorted(results.glob("*/*.json")) for r in json.loads(path.read_text())]
    headline = [r for r in records if r["preset"] in GROUPS["all"]]
    decoding = [r for r in records if r["T"] == 1 and r["pass"] == "fwd"]  # one query a row
    others = {r["preset"] for r in records} - {r["preset"] for r in headline + decoding}
    note = f"\n\nDecoding (forward, one query per sequence):\n\n{decode_markdown(decoding)}" \
        if decoding else ""
    if others:
        shown = len(headline) + len(decoding)
        note += (f"\n\n{len(records) - shown} more records of {len(others)} other "
                "presets (sweeps, scaled-down or custom problems) are in the JSON files of "
                "`benchmarks/results/<device>/`, drawn in its `plots/` "
                "(`python -m benchmarks.plots`).")
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    text = readme.read_text()
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{markdown(headline)}\n\n{tier_markdown(headline)}{note}\n"
                      f"{end}{tail}")


if __name__ == "__main__":  # python -m benchmarks.report: regenerate the README's table
    update_readme(RESULTS.parent.parent / "README.md")
